"""Run under torchrun with 4 ranks: distillation at PP=4 (one layer per stage of a 4-layer,
width-pruned student and the 4-layer teacher) with hidden-state pairs over up to all four stages
(``PP4_KD``), so carried states also pass through stages and a carried loss lands on a non-last
stage. Emits the per-step metrics like distill_layouts.py.
"""

import sys

from tests.workers.distill_layouts import job, run


# [0, 3]: projected student state sent by stage 0, passed on by 1 and 2, used on the last stage;
# [3, 1]: teacher state sent by stage 1 (idle slot on stage 0), used on stage 3;
# [1, 2]: student state used on stage 2, whose loss reaches the gradient through the output of a
# non-last stage and then the p2p backward to stage 1; [2, 2]: a same-stage pair
PP4_KD = dict(hidden_pairs=[[0, 3], [3, 1], [1, 2], [2, 2]], embedding_weight=0.5,
              hidden_dynamic=False)


def main(student, teacher, data, out):
    run("pp4_cross", job(student, teacher, data, out, 1, 4, **PP4_KD))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The test suite, a package so that tests, their shared helpers (``tests.helpers``) and the
torchrun workers (``tests.workers``) import each other by one name from the repository root."""

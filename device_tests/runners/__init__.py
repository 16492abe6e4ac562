"""Runners, one per runtime. Importing this package registers the built-in ones."""
from device_tests.runners.base import (Runner, load_builtin_runners, runner_class, runner_for,  # noqa: F401
                                       runner_for_format)

load_builtin_runners()

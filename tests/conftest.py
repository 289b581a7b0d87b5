"""Shared test settings: Hypothesis profiles, the CPU thread count, and the hostile-file fixture."""

import os

import pytest
import torch
from hypothesis import settings

# The test machine is small and noisy, so no profile sets a deadline.
settings.register_profile('dev', max_examples=25, deadline=None)
# CI replays the same examples on every run and prints the blob needed to reproduce a failure.
settings.register_profile('ci', max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci' if os.environ.get('CI') else 'dev'))

# Every tensor in the suite is tiny: one thread is fastest, and it stays fast on a loaded machine
# (two spinning OpenMP threads made tiny forwards 20x slower next to other jobs).
torch.set_num_threads(1)


class RunsACommand:
    """Pickles to os.system('touch marker'): what a tampered file would hold."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def hostile(tmp_path):
    """(an object whose unpickling runs a command, the file that command would create)."""
    marker = tmp_path / 'command_ran'
    return RunsACommand(marker), marker

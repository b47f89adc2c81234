"""`python tests/failing_rank.py RANK STEP ARGS...` under torchrun: `mapdit ARGS...` whose rank RANK raises a
UserError at the start of step STEP (0-based), to test that one failing rank ends the whole job. The failure
is patched into the batch source here, so that production code carries no test hook."""
import os
import sys

from mapdit import step as step_module
from mapdit.cli import main
from mapdit.errors import UserError

fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
draw = step_module.BatchSource.__call__


def failing(self, step):
    if int(os.environ.get("RANK", "0")) == fail_rank and step == fail_step:
        raise UserError(f"rank {fail_rank} failed at step {step} on purpose (tests/failing_rank.py)")
    return draw(self, step)


step_module.BatchSource.__call__ = failing
sys.exit(main(sys.argv[3:]))

"""A learning bar (tests/tasks/test_learning*.py): a margin over the strongest image-independent
baseline on one metric, after a fixed number of fine-tuning steps."""
import collections

# clears(model's value, strongest baseline's value) -> bool; margin says the same in words; lr is the
# peak learning rate of the fine-tuning run.
Bar = collections.namedtuple("Bar", "metric steps margin clears lr", defaults=(4e-3,))

"""Tasks: labelled data split into train / calibration / eval, with one preprocessing."""

from .tasks import TASKS, Task, load_task  # noqa: F401

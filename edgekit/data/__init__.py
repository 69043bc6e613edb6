"""Tasks: data split into disjoint train / calibration / eval, prepared by one preprocessing."""

from .tasks import TASKS, Task, load_task  # noqa: F401
from .preprocess import Preprocess  # noqa: F401
from . import folders, photos  # noqa: F401,E402 - register the imagefolder, images and photos tasks

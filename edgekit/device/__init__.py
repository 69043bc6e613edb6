"""Files that run on the device (bundle checks, runner, deploy agent): standard library (+ numpy and one runtime
for the runner) only. Nothing here imports edgekit: they are copied to the device as they are."""
from pathlib import Path

DEVICE_DIR = Path(__file__).resolve().parent

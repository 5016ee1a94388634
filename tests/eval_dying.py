"""A stand-in worker for the runner tests, kept apart so that spawned processes import little."""

import os


class DyingWorker:
    """Dies (the whole process, os._exit) on the samples named in `die`: once if a marker file is absent, always
    when `always`."""

    def __init__(self, marker_dir, die, always=False):
        self.marker_dir, self.die, self.always = marker_dir, die, always

    def run(self, ref, run_dir):
        if ref.id in self.die:
            marker = os.path.join(self.marker_dir, ref.id)
            if self.always or not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(3)
        return {"id": ref.id, "status": "done", "pid": os.getpid()}


def failing_worker():
    from fastdrag.errors import ModelLoadError

    raise ModelLoadError("no such model")

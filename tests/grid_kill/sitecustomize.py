"""Put on PYTHONPATH by tests/test_grid.py: when ``LALORA_TEST_KILL_CELL`` names a cell, the
first fine-tuning process running in that cell's workspace is SIGKILLed right after it saves
checkpoint ``LALORA_TEST_KILL_STEP`` (once: ``LALORA_TEST_KILL_MARKER`` records it), as a
preempted node would end it."""

import importlib.abc
import importlib.util
import os
import signal
import sys

CELL = os.environ.get("LALORA_TEST_KILL_CELL", "")


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "lalora.training.finetune":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            save = module.save_checkpoint

            def save_then_die(out, step, *args, **kwargs):
                final = save(out, step, *args, **kwargs)
                marker = os.environ["LALORA_TEST_KILL_MARKER"]
                if step == int(os.environ["LALORA_TEST_KILL_STEP"]) and not os.path.exists(marker):
                    open(marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                return final

            module.save_checkpoint = save_then_die

        spec.loader.exec_module = exec_module
        return spec


if CELL and CELL in os.getcwd():
    sys.meta_path.insert(0, _Hook())

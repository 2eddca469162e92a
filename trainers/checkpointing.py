"""Atomic checkpoints: ``checkpoint-N`` is written in a staging folder and renamed into place when complete."""

from __future__ import annotations

import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)


class AtomicCheckpointMixin:
    """``Trainer`` mixin (before the Trainer class in the bases): ``_save_checkpoint`` writes atomically when
    ``args.atomic_checkpoints`` (default True)."""

    _staging = False

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, ".staging") if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write ``checkpoint-N`` into ``<output_dir>/.staging/`` and move it into place only once every file (model,
        optimizer, scheduler, RNG states of all processes, trainer state) is written. A crash mid-save leaves the
        previous ``checkpoint-*`` untouched and nothing named ``checkpoint-N``, so ``resume_from_checkpoint=True``
        (``get_last_checkpoint``) finds the last complete one. transformers itself writes in place (5.x)."""
        if not self.args.atomic_checkpoints:
            return super()._save_checkpoint(model, trial)
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)  # left over by an earlier crash
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate in run_dir below, not in staging
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.state.best_model_checkpoint and os.path.dirname(
                os.path.abspath(self.state.best_model_checkpoint)
            ) == os.path.abspath(staging_root):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            if os.path.isdir(final):  # same step saved before (e.g. a resumed run re-saving): replace it
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)

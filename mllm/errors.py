"""Errors a user can fix: each says what is wrong, where, and how to fix it.

The CLI prints an `MllmError` as one line on stderr and exits with code 2; anything else is a bug in
mllm and keeps its traceback.

A full disk is a user error too: `DiskSpace` wraps a stage's writes under `output_dir`, refusing up front when the
disk holds less than the stage will write, and turning a write that still runs out of space into one line.
"""

from __future__ import annotations

from pathlib import Path

from mllm.basics import disk_full_cause, free_space, size_text


class MllmError(ValueError):
    """A problem with user input (config, data, models, URIs, storage)."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; fix: {fix}" if fix else what)


class ConfigError(MllmError):
    """The experiment config (YAML or `--set` overrides) is malformed or invalid."""


class DataError(MllmError):
    """A data source is missing, unreadable, or holds rows mllm cannot use."""


class ModelError(MllmError):
    """A model directory or id cannot be used (missing files, unsafe weights, wrong kind)."""


class DiskFullError(MllmError):
    """A folder mllm writes to has too little free space (refused up front, or a write ran out of it)."""


def disk_full(e: BaseException, root: Path | None = None, needs: int | None = None, doing: str | None = None,
              field: str = "output_dir") -> DiskFullError | None:
    """`e` as one line when its chain says a disk or quota is full (None otherwise): the folder (`field` `root`
    when the failed path lies under it or is not known), what was being written, the space needed and free, the
    fix. Called after the failed write's temporary files were removed, so "free" is what the disk holds again."""
    cause = disk_full_cause(e)
    if cause is None:
        return None
    written = getattr(cause, "filename", None)
    file = Path(written).absolute() if written else None
    ours = root is not None and (file is None or file.is_relative_to(Path(root).absolute()))
    folder = root if ours else file.parent if file else None
    where = f"{field} {root}" if ours else str(folder) if folder else "a disk mllm writes to"
    writing = f" writing {file.relative_to(Path(root).absolute()) if ours else file.name}" if file else ""
    during = f" while {doing}" if doing else ""
    space = [f"needs about {size_text(needs)}"] if needs and ours else []
    space += [f"{size_text(free_space(folder))} free"] if folder else []
    amounts = f" ({', '.join(space)})" if space else ""
    fix = (f"free space there or set {field} to a larger disk" if ours else
           "free space on that disk (output_dir, MLLM_CACHE_DIR, the temporary folder or the artifact store)")
    return DiskFullError(f"{where}: no space left on device{writing}{during}{amounts}", fix)


class DiskSpace:
    """A stage's writes under `root` (its `output_dir`).

        with DiskSpace(cfg.output_dir, "merging") as space:
            space.need(folder_bytes(member))  # refuses up front, in one line, when the disk has less free
            ...                               # a write that still runs out of space leaves as one line too

    Runs opened inside the block end FAILED on the way out (as for any error), before anything is registered;
    mllm's atomic writers (`mllm.basics.atomic_dir`, `atomic_file`) remove their temporaries, so nothing
    half-written looks complete to a rerun, which resumes once space is freed."""

    def __init__(self, root: Path, doing: str, field: str = "output_dir") -> None:
        self.root, self.doing, self.field = Path(root), doing, field
        self.needs: int | None = None

    def need(self, nbytes: int, doing: str | None = None) -> None:
        """Refuse when the disk under `root` has fewer than `nbytes` free (an estimate of what will be written)."""
        self.needs, self.doing = nbytes, doing or self.doing
        free = free_space(self.root)
        if free < nbytes:
            raise DiskFullError(f"{self.field} {self.root}: not enough free space for {self.doing} (needs about "
                                f"{size_text(nbytes)}, {size_text(free)} free)",
                                f"free space there or set {self.field} to a larger disk")

    def __enter__(self) -> DiskSpace:
        return self

    def __exit__(self, kind: object, e: BaseException | None, traceback: object) -> None:
        if isinstance(e, Exception) and not isinstance(e, DiskFullError):
            problem = disk_full(e, self.root, self.needs, self.doing, self.field)
            if problem is not None:
                raise problem from e


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (Slurm preemption, `kill`, timeouts): runs
    end KILLED and the CLI exits 143."""

"""Run (or resume) a study and write its RESULTS.md from the study's MLflow runs.

    python scripts/study.py configs/studies/drugs.yaml               # every unfinished cell, then the report
    python scripts/study.py configs/studies/drugs.yaml --fold 0       # fold 0 of every arm, then the report
    python scripts/study.py configs/studies/drugs.yaml --report-only  # the report from the finished cells
    python scripts/study.py configs/studies/drugs.yaml --report-only --export docs/results/drugs-study-store.tar.gz
    python scripts/study.py configs/studies/drugs.yaml --import docs/results/drugs-study-store.tar.gz  # resume

A study is arms x folds cells (mllm.study.config); each cell is an MLflow experiment <study>-<arm>-f<fold> in the
study's store. An interrupted study resumes: finished cells are reused, registered members are not retrained, and
a cell's Optuna search continues up to its trials. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="study config (YAML), e.g. configs/studies/drugs.yaml")
    parser.add_argument("--arm", action="append", help="run only this arm (repeatable)")
    parser.add_argument("--fold", action="append", type=int, help="run only this fold (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from finished cells only")
    parser.add_argument("--no-report", action="store_true", help="run cells, do not write RESULTS.md")
    parser.add_argument("--export", metavar="TAR_GZ", help="then write the light store (databases, small artifacts)")
    parser.add_argument("--import", dest="import_", metavar="TAR_GZ",
                        help="first unpack a light store written by --export (into an empty study store)")
    args = parser.parse_args(argv)

    from mllm.errors import MllmError
    from mllm.study.config import load_study
    from mllm.study.runner import run_study, write_report
    from mllm.study.store import export_store, import_store

    try:
        study = load_study(args.config)
        bad = [f for f in args.fold or [] if not 0 <= f < study.folds]
        if bad:
            raise MllmError(f"--fold {bad[0]}: the study has folds 0..{study.folds - 1}", "pass one of those")
        if args.import_:
            import_store(study, Path(args.import_))
        if not args.report_only:
            run_study(study, args.arm, args.fold)
        if not args.no_report:
            write_report(study, args.config)
        if args.export:
            export_store(study, Path(args.export))
    except MllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

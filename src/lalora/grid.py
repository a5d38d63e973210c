"""``python -m lalora.grid plan|submit|collect conf/sweep/<grid>.yaml``: a grid of studies,
planned (:mod:`lalora.scale.grid`), submitted (:mod:`lalora.scale.launcher`) and collected
(:mod:`lalora.scale.collect`)."""

from __future__ import annotations

from pathlib import Path

from lalora.core.cli import run
from lalora.scale.grid import GridError, load_grid, plan


def main() -> None:
    """``python -m lalora.grid plan|submit|collect conf/sweep/<grid>.yaml``: print the jobs
    and their cost; submit the cells not yet landed (``--executor local`` here, ``slurm`` or
    ``auto`` on a cluster; ``--wait`` watches and resubmits failures); pull the landed cells'
    experiments and write ``grids/<name>/`` (``--no-pull``: the experiments already here)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=("plan", "submit", "collect"))
    parser.add_argument("grid", type=Path)
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--executor", default="auto", choices=("auto", "slurm", "local"))
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--git-remote", default="origin")
    parser.add_argument("--workdir", default="", help="where jobs make their workspaces")
    parser.add_argument("--sync-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None, help="default grids/<name>")
    parser.add_argument("--no-pull", action="store_true")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    if args.command == "collect":
        from lalora.scale.collect import pull, read_cells, write_grid

        cells = grid.cells()
        if not args.no_pull:
            from lalora.scale.launcher import remote_experiments

            landed = remote_experiments(args.project, args.git_remote)
            pull(args.project, [c.name for c in cells if c.name in landed], args.git_remote)
        out = args.out or args.project / "grids" / grid.name
        write_grid(grid, read_cells(args.project, cells), out)
        print((out / "grid.md").read_text())
        return
    rows, table = plan(args.project, grid)
    print(table, flush=True)
    if args.command == "submit":
        from lalora.scale.launcher import submit

        states = submit(args.project, grid, rows, args.executor, args.retries, args.wait,
                        args.git_remote, args.workdir, args.sync_seconds)  # fmt: skip
        for name, state in states.items():
            print(f"{name}: {state}")
        if any(s.startswith("failed") for s in states.values()):
            raise GridError(
                f"grid {grid.name}: some cells failed (logs in "
                f".dvc/tmp/grid/{grid.name}); submit again to resume them"
            )


if __name__ == "__main__":
    run(main)

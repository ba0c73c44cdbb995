"""Write the small task files the tests read: the first ITEMS items of each of strata's own tasks,
built from the named corpora exactly as ``strata data fetch TASK`` builds the whole task.

    python tests/data/make_tasks.py

``tests/test_data_tasks.py`` checks that the files here are still what this writes.
"""

from pathlib import Path

from strata.data.tasks import TASKS, build_task, write_task

ITEMS = 60
FOLDER = Path(__file__).resolve().parent / "tasks"


def main() -> None:
    for name in TASKS:
        write_task(build_task(name, ITEMS), FOLDER / f"{name}.jsonl")
        print(FOLDER / f"{name}.jsonl")


if __name__ == "__main__":
    main()

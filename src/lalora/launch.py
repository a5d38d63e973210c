"""``python -m lalora.launch``: start a stage script on one process, warm, or under
torchrun (:mod:`lalora.scale.launch`)."""

from lalora.scale.launch import main

if __name__ == "__main__":
    main()

"""``python -m lalora.gpu_check``: the study's GPU path in minutes, offline (``make
gpu-check``) (:mod:`lalora.study.gpu_check`)."""

from lalora.study.gpu_check import main

if __name__ == "__main__":
    main()

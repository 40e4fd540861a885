"""Peak host memory and page faults of the current process, with the standard library only (both the
JAX benchmark and its torchvision child, which runs in another venv, import it)."""

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. VmHWM, unlike getrusage's
    ru_maxrss, is not inherited from the parent across fork and exec; getrusage
    is the fallback where /proc is missing."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_page_faults() -> int:
    """This process's minor page faults so far (pages the kernel mapped and zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

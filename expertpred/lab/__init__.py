"""Research harnesses, not used at inference time: ``iotrace`` (which reads hit the disk),
``experiment`` (memory-limit sweeps), ``cgroup`` (memory cgroups v1), ``evictprobe``
(eviction advice on page-cache pages) and ``analysis`` (routing reports)."""

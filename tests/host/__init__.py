"""Host tier: real processes, system calls and compilers on the host; no device, no root needed."""

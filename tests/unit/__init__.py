"""Unit tier: pure logic, and the kernel replaced behind the syscall seam (uvdma.testing)."""

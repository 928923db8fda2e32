"""Tests of the test harness itself (the Kubernetes API emulator and its controllers)."""

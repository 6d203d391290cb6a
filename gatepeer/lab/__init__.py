"""The emulated SORACOM side: API emulator and network-namespace topology."""

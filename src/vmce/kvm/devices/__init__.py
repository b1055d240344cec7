"""Emulated devices on the port-I/O bus: 16550A UART, debug-exit port, test probe port."""

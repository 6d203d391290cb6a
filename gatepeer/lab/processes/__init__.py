"""What runs in the lab, each started in its namespace and stopped by its pid: the emulator's
process, the gate peer (baseline or agent), the HA pair, the VPC route table stand-in, the
demo's traffic."""

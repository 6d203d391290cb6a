"""Everything that reads or changes the kernel: netlink, sysctl, nftables."""

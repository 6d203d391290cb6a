"""The lab's network: the address plan and layout, iproute2 in named namespaces, building
the namespaces and links, and the emulated VPG endpoints following the API."""

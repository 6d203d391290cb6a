"""The lab: the SORACOM side of a gate peer, built from network namespaces on one host.

```
 {p}-vpc  198.18.0.20 ──┐                 ┌── 198.18.1.11 {p}-vpg1 ─ 198.18.2.0/30 ─┐
                        ├─ vpcbr {p}-fabric sorabr ─┤     (VXLAN VNI, proxy ARP)      ├─ {p}-dev
 {p}-peer 198.18.0.10 ──┘ 198.18.0.1  198.18.1.1 └── 198.18.1.12 {p}-vpg2 ─ 198.18.2.4/30 ─┘
                         API 203.0.113.10:8080 on lo
```

- fabric: the VPC router. 198.18.0.0/24 is the VPC subnet, 198.18.1.0/24 stands for the VPC
  peering path to SORACOM's VPG, the API emulator listens on 203.0.113.10:8080,
  198.51.100.1 plays a host on the internet, and 198.18.3.(10+N) (the VPG's NAT addresses) are
  routed to endpoint N.
- peer: the gate peer instance (eth0 is its ENI). The agent, or the hand-made baseline, runs here.
- vpc: a VPC host whose route table sends the device subnet to the gate peer.
- vpgN: one VPG tunnel endpoint each: vxlan0 with one all-zero-MAC FDB entry per registered
  customer gate peer (kept in step with the emulator by `sync_peers`), proxy ARP for the devices,
  and policy routing of the devices' traffic as SORACOM's VPG does it: inside the device subnet
  over the tunnel (ARP finds the owner); outside it to the Junction redirection gateway over the
  tunnel while the emulator's redirection is enabled (`sync_redirection`), else out of eth0
  source-NATed to the VPG's address 198.18.3.(10+N) (its Canal / internet path), where a
  device's reply to a connection opened through the tunnel is dropped: no reply, as on SORACOM.
- dev: the devices (SIMs): /32 addresses in the upper half of the device subnet.

Only 198.18.0.0/15 and the TEST-NET ranges are used, and only inside the lab's namespaces.

Where each part lives: `layout` (address plan, Layout, the lab's files), `build` (namespaces and
links), `vpg` (endpoints following the API's peers and redirection), `processes` (emulator and
iperf3 processes), `api` (a small API client), `lifecycle` (up, down, status), `gate_peer`
(baseline or agent bring-up), `demo` (the demo's traffic).
"""

from __future__ import annotations

from gatepeer.lab.api import (
    LabApi,
    lab_api,
)
from gatepeer.lab.build import (
    BuildReport,
    ensure_topology,
    render_vpg_nat,
)
from gatepeer.lab.demo import (
    DemoStep,
    demo_traffic,
    iperf,
    start_iperf_server,
    stop_iperf_server,
)
from gatepeer.lab.gate_peer import (
    agent_command,
    agent_gate_peer,
    baseline_gate_peer,
    prefixlen,
)

# The lab used to be this one module; its parts now live in the modules below, and these
# names stay importable from here for the code and scripts that use them.
from gatepeer.lab.layout import (
    ALLOWED_NETS,
    API_ADDR,
    API_PORT,
    BASELINE_SCRIPT,
    DEFAULT_DEVICE_SUBNET,
    DEFAULT_HOST_PORT,
    DEFAULT_PREFIX,
    DEFAULT_VNI,
    DEVICE_LINKS_NET,
    DEVICES_LINK,
    FABRIC_SORACOM_ADDR,
    FABRIC_VPC_ADDR,
    INTERNET_ADDR,
    OVERLAY_MTU,
    PEER_ADDR,
    PREFIX_RE,
    RESERVED_NET,
    RETURN_RULE_PREF,
    RETURN_TABLE,
    RUN_ROOT,
    SORACOM_NET,
    UNDERLAY_MTU,
    VPC_HOST_ADDR,
    VPC_NET,
    VPG_NAT_NET,
    VPG_NAT_TABLE,
    VXLAN_PORT,
    ZERO_MAC,
    Credentials,
    Endpoint,
    LabRecord,
    Layout,
    Paths,
    default_host_port,
    parse_subnet,
    render_config,
    write_private,
)
from gatepeer.lab.lifecycle import (
    DownReport,
    GatePeerBringUp,
    LabInfo,
    Status,
    down,
    emulator_state,
    lab_namespaces,
    redirect,
    resolve_layout,
    status,
    up,
)
from gatepeer.lab.netns import LabError
from gatepeer.lab.processes import (
    emulator_pid,
    pid_alive,
    proc_cmdline,
    read_emulator_json,
    start_emulator,
    stop_emulator,
    stop_recorded_iperf,
)
from gatepeer.lab.vpg import (
    customer_peers,
    endpoint_fdb,
    endpoint_gateway,
    redirection_gateway,
    sync_peers,
    sync_redirection,
)

_prefixlen = prefixlen  # bench/benchlib.py's name for it

__all__ = [
    "ALLOWED_NETS",
    "API_ADDR",
    "API_PORT",
    "BASELINE_SCRIPT",
    "BuildReport",
    "Credentials",
    "DEFAULT_DEVICE_SUBNET",
    "DEFAULT_HOST_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_VNI",
    "DEVICES_LINK",
    "DEVICE_LINKS_NET",
    "DemoStep",
    "DownReport",
    "Endpoint",
    "FABRIC_SORACOM_ADDR",
    "FABRIC_VPC_ADDR",
    "GatePeerBringUp",
    "INTERNET_ADDR",
    "LabApi",
    "LabError",
    "LabInfo",
    "LabRecord",
    "Layout",
    "OVERLAY_MTU",
    "PEER_ADDR",
    "PREFIX_RE",
    "Paths",
    "RESERVED_NET",
    "RETURN_RULE_PREF",
    "RETURN_TABLE",
    "RUN_ROOT",
    "SORACOM_NET",
    "Status",
    "UNDERLAY_MTU",
    "VPC_HOST_ADDR",
    "VPC_NET",
    "VPG_NAT_NET",
    "VPG_NAT_TABLE",
    "VXLAN_PORT",
    "ZERO_MAC",
    "agent_command",
    "agent_gate_peer",
    "baseline_gate_peer",
    "customer_peers",
    "default_host_port",
    "demo_traffic",
    "down",
    "emulator_pid",
    "emulator_state",
    "endpoint_fdb",
    "endpoint_gateway",
    "ensure_topology",
    "iperf",
    "lab_api",
    "lab_namespaces",
    "parse_subnet",
    "pid_alive",
    "prefixlen",
    "proc_cmdline",
    "read_emulator_json",
    "redirect",
    "redirection_gateway",
    "render_config",
    "render_vpg_nat",
    "resolve_layout",
    "start_emulator",
    "start_iperf_server",
    "status",
    "stop_emulator",
    "stop_iperf_server",
    "stop_recorded_iperf",
    "sync_peers",
    "sync_redirection",
    "up",
    "write_private",
]

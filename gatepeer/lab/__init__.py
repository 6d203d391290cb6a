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

Where each part lives:

- `network/`: the address plan and layout (`layout`), iproute2 in namespaces (`netns`), building
  the namespaces and links (`build`), the VPG endpoints following the API (`vpg`);
- `emulator/`: the SORACOM API emulator (`model`, `operations`, `requests`, `http_server`,
  `service`), its one process entry `python -m gatepeer.lab.emulator` (`__main__`) and its lab
  mode (`lab_process`);
- `processes/`: what runs in the lab, started and stopped by pid (`pids`): the emulator's
  process (`emulator_process`), the gate peer's bring-up (`gate_peer`), the HA pair
  (`ha_pair`), the VPC route table stand-in (`vpc_routes`), the demo's traffic (`traffic`);
- `record`: the lab's folder (lab.json, the auth key, the agent's configs) and `LabInfo`;
- `api_client`: a small SORACOM API client for the lab's own calls;
- `control`: `lab up`, `down`, `status`, `redirect`; `cli`: the `gatepeer lab` commands.

Imports run one way: cli -> control -> processes -> network and record; emulator -> network.
"""

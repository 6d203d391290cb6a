"""Builders and fakes the tests share. Tests import from here, never from one another
(tests/helpers/ is on sys.path through pyproject's `pythonpath`).

The tests sit by what they need: tests/unit/ runs anywhere, tests/lab/ needs root and network
namespaces, tests/delivery/ checks the image, the unit file, Packer, cloud-init and the
monitoring files; golden files are under tests/golden/, SORACOM's spec excerpt under tests/spec/.

- `plan_inputs`: host facts, a gate view, configs, desired and converged observed states;
- `fake_kernel`: a kernel the agent reconciles against without netlink;
- `config_files`: a valid `[soracom]` section, a key file, a written config;
- `ruleset_specs`: the packet-path specs the golden files are rendered from;
- `readings`: a healthy vxlan0 as the kernel reads it (`link()`);
- `metrics_sources`: the metrics collectors' sources, faked (the golden files' inputs);
- `soracom_spec`: SORACOM's API spec as a validating contract; `http_client`: one raw request;
- `monitoring_files`: the alert rules, the dashboard and the metric names they use;
- `lab_checks`, `packet_path`: looking at a running lab's peer, and traffic through it;
- `lab_agent`: the agent run in a lab's peer namespace; `kernel_ns`: the agent against a
  namespace's real kernel; `aws_fakes`: moto's server and botocore stubs for the AWS calls;
- `recipe_lab`: the closed-network recipes' AWS side beside a lab (moto's EC2 through
  `moto_lab_server`, a services host, a dnsmasq resolver) and a device resolving through it.
- `flow_probe` (a program run by path in a lab namespace) and `failover_traffic` (starts it by
  pid): TCP echo connections and a UDP flow through a failover, their stalls, resets and losses.
"""

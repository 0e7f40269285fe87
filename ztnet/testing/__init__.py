"""Harnesses that tests, benchmarks and the Vagrant checks share: real ztnet processes
(controller, daemon, agents) started, awaited and stopped; a host that enrolls and speaks
the grant or flow stream by hand; free loopback ports.

Library code, not tests: nothing here imports pytest or tests/, and nothing in ztnet outside
this package imports it (it sits on top of every layer but the CLI, which it runs only as a
subprocess). Factories of test data and pytest fixtures stay in tests/.

* controller: ControllerState, init_controller, policy_toml, write_policy, admin_credentials,
  create_token, ControllerProcess
* nodes: HostIdentity, make_csr, private_pem, enroll, Push, FakeNode
* flows: Reported, report (a raw ReportFlows client)
* daemon: DaemonProcess, make_bundle, HOST
* agents: agent_argv, traffic_argv, run_traffic, allow_ping_sockets, LineProcess
* ports: free_port
"""

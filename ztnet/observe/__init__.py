"""Flow records, their sinks, metrics, the audit trail and `ztnet observe`.

Pure user space: nothing here touches BPF. Data flows one way, kernel →
``KernelEvent`` → ``FlowRecord`` → sinks. docs/flows.md documents the
record schema, the files and the loss counters.

Modules: ``records`` (FlowRecord, from_event, to_json/from_json),
``context`` (RecordContext, GrantInfo, exe resolvers), ``sinks`` (Sink,
Dispatcher, JsonlSink), ``audit`` (AuditLog, AuditSink, verify),
``metrics`` (FlowMetrics, start_http_server), ``query``/``tail``/``render``
and ``commands`` (`ztnet observe`, `ztnet audit verify`).

The daemon's wiring of these pieces (context, sinks, metrics, audit log, the
event reader) lives in ``ztnet.daemon.flows.FlowPipeline``: read it there.
"""

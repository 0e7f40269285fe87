"""Flow records, their sinks, metrics, the audit trail and `ztnet observe`.

Pure user space: nothing here touches BPF. Data flows one way, kernel →
``KernelEvent`` → ``FlowRecord`` → sinks. docs/flows.md documents the
record schema, the files and the loss counters.

Modules: ``records`` (FlowRecord, from_event, to_json/from_json),
``context`` (RecordContext, GrantInfo, exe resolvers), ``sinks`` (Sink,
Dispatcher, JsonlSink), ``audit`` (AuditLog, AuditSink, verify),
``metrics`` (FlowMetrics, start_http_server), ``query``/``tail``/``render``
and ``commands`` (`ztnet observe`, `ztnet audit verify`).

How the daemon wires this::

    from ztnet.observe import audit, metrics, records, sinks

    ctx = records.RecordContext(host=host, trust_domain=trust_domain,
                                agent_names=datapath.agent_names(),
                                grants=records.grant_infos(
                                    (g.grant_id for g in verified.grants),
                                    verified.version, verified.key_id),
                                exe=records.CachedExe())
    audit_log = audit.AuditLog(state / "audit.jsonl")
    flow_metrics = metrics.FlowMetrics()
    dispatcher = sinks.Dispatcher([sinks.JsonlSink(state / "flows.jsonl"),
                                   flow_metrics, audit.AuditSink(audit_log)]).start()
    server = metrics.start_http_server("127.0.0.1:9464", flow_metrics.registry)  # --metrics

    # reader thread (the process that loaded the programs):
    reader = datapath.event_reader(
        lambda event: dispatcher.submit(records.from_event(event, self.ctx)))
    while running:
        reader.poll(100)

    # on every bundle applied: swap the context (one attribute write), record it
    self.ctx = dataclasses.replace(ctx, grants=..., agent_names={**old_names, **new})
    audit_log.append(audit.BUNDLE_APPLIED, {"version": v, "key_id": k, "grants": n,
                                            "payload_sha256": h})
    audit_log.append(audit.GRANT_ADDED, {"id": "g-…", "agent": a, ...})  # per change
    flow_metrics.bundle_applied(v); flow_metrics.set_active_grants(live_counts)
    # on a rejected bundle
    audit_log.append(audit.BUNDLE_REJECTED, {"reason": str(exc)})
    flow_metrics.bundle_rejected(type(exc).__name__)
    # periodically (e.g. each resync), surface the losses
    flow_metrics.set_kernel_counters(datapath.counters())
    flow_metrics.set_dispatcher_stats(dispatcher.stats())

    # shutdown: deliver what is queued, then close the sinks and the log
    dispatcher.close(); audit_log.close(); server.close()
"""

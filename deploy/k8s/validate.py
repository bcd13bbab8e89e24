#!/usr/bin/env python3
"""Validates the Kubernetes manifests of deploy/k8s (run it through validate.sh).

1. Renders the kustomization as `kubectl apply -k` would (`kubectl kustomize`;
   without kubectl, a minimal stand-in for what this kustomization uses).
2. Checks every built-in resource against the Kubernetes OpenAPI schemas
   bundled in the kubernetes-validate package, strictly (an unknown or
   misspelled field is an error), for each Kubernetes version in
   KAPPA_K8S_VERSIONS.
3. Checks every custom resource (Strimzi, CloudNativePG) against the schema
   of its CRD, vendored in schemas/ (see schemas/README.md), as strictly as
   the API server with kubectl's default field validation: unknown fields are
   errors. The CRDs' CEL rules (x-kubernetes-validations) are not evaluated.
4. Checks what no schema can: selectors match pod labels, Services and
   probes name declared ports, referenced ConfigMaps, Secrets and volumes
   exist, liveness probes on /healthz and readiness probes on /readyz, the
   topic's partition count is the config's log.partitions, the workers never
   outnumber the partitions, every Kafka client (log.kafka, and
   alerts.kafka on the primary) dials a TLS listener's bootstrap address,
   trusts the cluster CA mounted from its Secret and logs in as a KafkaUser
   whose password comes from a Secret and whose ACLs allow what the pod
   does, the PostgreSQL URL comes from CloudNativePG's Secret, exactly one
   primary ([cluster] primary, from the config with each container's
   environment) of one replica that is never doubled by a rollout, every
   other node with KAPPA_CLOUD__CLUSTER__PRIMARY=false, and a local archive
   on a PersistentVolumeClaim.
5. With a kappa-cloud binary (--cloud-bin), runs `kappa-cloud config check`
   on the rendered ConfigMap with each container's own environment
   overrides (a value from a Secret replaced by a stand-in), so the config
   each pod gets passes the real parser.

Exit status: 0 when everything passes, 1 when anything fails (every problem
is printed), 2 when the check itself cannot run.

`validate.py extract-crd CRD.yaml... --out schemas/` regenerates the
vendored schemas from CRD files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
# The oldest Kubernetes these manifests claim to support, and the newest the
# checker knows.
DEFAULT_VERSIONS = "1.30,latest"
ENV_PREFIX = "KAPPA_CLOUD__"
# Secrets that an operator creates (not in the bundle): CloudNativePG makes
# `<cluster>-app` with the application owner's credentials and `uri`;
# Strimzi makes `<kafka>-cluster-ca-cert` with the cluster CA (`ca.crt`) and,
# for a KafkaUser, a Secret of the user's name (`password`, `sasl.jaas.config`
# for SCRAM-SHA-512).
OPERATOR_SECRETS = {
    ("postgresql.cnpg.io", "Cluster"): ("{name}-app", "{name}-ca"),
    ("kafka.strimzi.io", "Kafka"): ("{name}-cluster-ca-cert",),
    ("kafka.strimzi.io", "KafkaUser"): ("{name}",),
}
# The group id kappa-cloud's readers outside any consumer group (the
# primary's pipelines, which assign every partition) carry; librdkafka still
# looks up its coordinator (cloud/src/eventlog/kafka.rs).
ASSIGN_GROUP = "kappa-unused"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def group_of(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


# ---------------------------------------------------------------- rendering


def render(directory: Path) -> list[dict]:
    """The resources `kubectl apply -k directory` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"kubectl kustomize {directory} failed:\n{out.stderr}")
        text = out.stdout
        print(f"rendered with {kubectl} kustomize")
    else:
        print("kubectl not found: rendering with the minimal stand-in (resources, configMapGenerator, namespace)")
        text = yaml.safe_dump_all(render_without_kubectl(directory))
    return [d for d in yaml.safe_load_all(text) if d]


def render_without_kubectl(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(k) - {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions"}
    if unsupported:
        raise SystemExit(f"the stand-in renderer does not support {sorted(unsupported)}; install kubectl")
    docs = []
    for r in k.get("resources", []):
        docs += [d for d in yaml.safe_load_all((directory / r).read_text()) if d]
    for g in k.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in g.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    if "namespace" in k:
        for d in docs:
            if d["kind"] != "Namespace":
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def unlisted_manifests(directory: Path) -> list[str]:
    """YAML files in the directory that the kustomization does not apply."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = {str(Path(r)) for r in k.get("resources", [])}
    return [
        f"{p.name}: not listed in kustomization.yaml resources, so neither applied nor validated"
        for p in sorted(directory.glob("*.yaml"))
        if p.name != "kustomization.yaml" and p.name not in listed
    ]


# ------------------------------------------------------------------ schemas


def crd_schemas() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> JSON schema, from schemas/*.json."""
    out = {}
    for f in sorted(SCHEMAS.glob("*.json")):
        s = json.loads(f.read_text())
        out[(s["x-kappa-group"], s["x-kappa-version"], s["x-kappa-kind"])] = s
    return out


def validate_schema(doc: dict, versions: list[str], crds: dict) -> list[str]:
    name = f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"
    problems = []
    for key in ("apiVersion", "kind", "metadata"):
        if key not in doc:
            problems.append(f"{name}: no {key}")
    if problems:
        return problems
    api = doc["apiVersion"]
    g, v = (api.split("/") + [""])[:2] if "/" in api else ("", api)
    schema = crds.get((g, v, doc["kind"]))
    if schema is not None:
        if not doc["metadata"].get("name"):
            problems.append(f"{name}: metadata.name is empty")
        validator = jsonschema.Draft7Validator(schema)
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            problems.append(f"{name}: {path}: {e.message} [CRD schema {schema['x-kappa-source']}]")
        return problems
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            problems.append(f"{name}: {path}: {e.message} [Kubernetes {e.version}, strict]")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: {e.message}; a custom resource needs its CRD's schema in schemas/")
    return problems


# ---------------------------------------------------------- cross-checks


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in WORKLOADS:
        return doc.get("spec", {}).get("template", {}).get("spec", {})
    return None


def template_labels(doc: dict) -> dict:
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def kappa_containers(doc: dict):
    spec = pod_spec(doc)
    for c in (spec or {}).get("containers", []):
        if "kappa-cloud" in c.get("image", ""):
            yield c


def cloud_config_for(doc: dict, container: dict, by_name: dict) -> str | None:
    """The text of the file a kappa-cloud container's --config names, from its ConfigMap."""
    args = container.get("args", [])
    if "--config" not in args:
        return None
    path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mount):
            continue
        cm = by_name.get(("ConfigMap", volumes.get(m["name"], {}).get("configMap", {}).get("name")))
        key = m.get("subPath") or path[len(mount):]
        if cm is not None and key in cm.get("data", {}):
            return cm["data"][key]
    return None


def env_overrides(container: dict) -> dict[str, str | None]:
    """KAPPA_CLOUD__* variables: their literal value, or None when taken from a Secret."""
    return {e["name"]: e.get("value") for e in container.get("env", []) if e["name"].startswith(ENV_PREFIX)}


def env_path(name: str) -> tuple[str, ...]:
    """The config path a KAPPA_CLOUD__* variable sets: segments split on `__`, lowercased
    (a dot stays inside its segment: ...__PROPERTIES__SASL.PASSWORD -> "sasl.password")."""
    return tuple(name[len(ENV_PREFIX):].lower().split("__"))


def with_overrides(cfg: dict, env: dict[str, str | None]) -> dict:
    """The parsed config with the literal overrides applied, as kappa_runtime::config does:
    a value is TOML when it parses as one, a string otherwise."""
    cfg = json.loads(json.dumps(cfg))
    for name, raw in env.items():
        if raw is None:
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = cfg
        path = env_path(name)
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return cfg


def known_secrets(docs: list[dict]) -> set[str]:
    """Secrets in the bundle and those its operators' resources make."""
    out = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for d in docs:
        for pattern in OPERATOR_SECRETS.get((group_of(d["apiVersion"]), d["kind"]), ()):
            out.add(pattern.format(name=d["metadata"]["name"]))
    return out


def check_workloads(docs: list[dict], by_name: dict) -> list[str]:
    """Selectors, volumes, Secrets and probe ports of every workload; what every kappa-cloud container needs."""
    problems = []
    secrets = known_secrets(docs)
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        n = f"{w['kind']}/{w['metadata']['name']}"
        sel = w["spec"].get("selector", {}).get("matchLabels", {})
        if not matches(sel, template_labels(w)):
            problems.append(f"{n}: spec.selector.matchLabels {sel} do not match the pod template's labels")
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in by_name:
                problems.append(f"{n}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v and v["secret"]["secretName"] not in secrets and not v["secret"].get("optional"):
                problems.append(f"{n}: volume {v['name']}: no Secret {v['secret']['secretName']}")
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec.get("containers", []):
            cn = f"{n} container {c['name']}"
            ports = {p.get("name") for p in c.get("ports", [])}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claims:
                    problems.append(f"{cn}: volumeMount {m['name']} names no volume")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets and not ref.get("optional"):
                    problems.append(f"{cn}: env {e['name']}: no Secret {ref['name']} (nor one an operator makes)")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c.get(probe, {}).get("httpGet")
                if get and isinstance(get["port"], str) and get["port"] not in ports:
                    problems.append(f"{cn}: {probe} port {get['port']!r} is not a declared port")
        for c in kappa_containers(w):
            cn = f"{n} container {c['name']}"
            # Nodes and workers both serve /healthz (the process answers) and
            # /readyz (a node: its event log takes appends; a worker: it holds
            # its share, restored). Liveness on /readyz would restart pods for
            # an outage of Kafka or PostgreSQL that a restart cannot fix.
            for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                if probe not in c:
                    if probe != "startupProbe":
                        problems.append(f"{cn}: no {probe} (kappa-cloud serves /healthz and /readyz)")
                elif "httpGet" not in c[probe]:
                    problems.append(f"{cn}: {probe} is not an httpGet on {path}")
                elif c[probe]["httpGet"].get("path") != path:
                    problems.append(f"{cn}: {probe} path {c[probe]['httpGet'].get('path')} should be {path}")
            sc = c.get("securityContext", {})
            if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False):
                problems.append(f"{cn}: needs readOnlyRootFilesystem: true and allowPrivilegeEscalation: false")
            if not (spec.get("securityContext", {}).get("runAsNonRoot") or sc.get("runAsNonRoot")):
                problems.append(f"{cn}: needs runAsNonRoot: true")
            if not {"requests", "limits"} <= set(c.get("resources", {})):
                problems.append(f"{cn}: needs resource requests and limits")
    return problems


def check_selectors(docs: list[dict]) -> list[str]:
    """Services and PodDisruptionBudgets select pods, and Services target their ports."""
    problems = []
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for s in (d for d in docs if d["kind"] == "Service"):
        n = f"Service/{s['metadata']['name']}"
        sel = s["spec"].get("selector", {})
        targets = [w for w in workloads if matches(sel, template_labels(w))]
        if not targets:
            problems.append(f"{n}: selector {sel} selects no pod template")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            for w in targets:
                ports = [q for c in pod_spec(w)["containers"] for q in c.get("ports", [])]
                if tp not in {q.get("name") for q in ports} | {q["containerPort"] for q in ports}:
                    problems.append(f"{n}: targetPort {tp!r} is not a port of {w['kind']}/{w['metadata']['name']}")
    for p in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        sel = p["spec"].get("selector", {}).get("matchLabels", {})
        if not any(matches(sel, template_labels(w)) for w in workloads):
            problems.append(f"PodDisruptionBudget/{p['metadata']['name']}: selector {sel} selects no pod template")
    return problems


def check_topology(docs: list[dict], by_name: dict) -> list[str]:
    """Each kappa-cloud container's config against the Kafka topic, PostgreSQL and the worker count."""
    problems = []
    kafkas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Kafka"}
    topics = {d.get("spec", {}).get("topicName", d["metadata"]["name"]): d for d in docs if d["kind"] == "KafkaTopic"}
    pg_secrets = {
        f"{d['metadata']['name']}-app"
        for d in docs
        if d["kind"] == "Cluster" and group_of(d["apiVersion"]) == "postgresql.cnpg.io"
    }
    for t in topics.values():
        cluster = t["metadata"].get("labels", {}).get("strimzi.io/cluster")
        if cluster not in kafkas:
            problems.append(f"KafkaTopic/{t['metadata']['name']}: label strimzi.io/cluster={cluster!r} names no Kafka")
    hpas = {}
    for h in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in by_name:
            problems.append(f"HorizontalPodAutoscaler/{h['metadata']['name']}: scales {ref['kind']}/{ref['name']}, which is not here")
        hpas[(ref["kind"], ref["name"])] = h
    partitions_seen = set()
    nodes: list[str] = []  # kappa-cloud run
    primaries: list[str] = []  # of them, those with [cluster] primary
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        for c in kappa_containers(w):
            cn = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
            text = cloud_config_for(w, c, by_name)
            if text is None:
                problems.append(f"{cn}: --config does not name a file of a mounted ConfigMap")
                continue
            cfg = with_overrides(tomllib.loads(text), env_overrides(c))
            log = cfg.get("log", {})
            kafka = log.get("kafka", {})
            partitions = log.get("partitions", 8)
            partitions_seen.add(partitions)
            role = c.get("args", [""])[0]
            # kappa-cloud's CloudConfig::primary(): a node without [cluster], or with
            # [cluster] primary unset or true, runs the primary's pipelines.
            is_primary = role == "run" and ("cluster" not in cfg or cfg["cluster"].get("primary", True) is not False)
            topic = topics.get(kafka.get("topic", "kappa-events"))
            if topic is None:
                problems.append(f"{cn}: log.kafka.topic {kafka.get('topic', 'kappa-events')!r} has no KafkaTopic")
            else:
                if topic["spec"].get("partitions") != partitions:
                    problems.append(
                        f"{cn}: log.partitions = {partitions} but KafkaTopic/{topic['metadata']['name']} has "
                        f"{topic['spec'].get('partitions')} partitions (the node refuses a topic whose count differs)"
                    )
                cluster = topic["metadata"].get("labels", {}).get("strimzi.io/cluster")
                if cluster in kafkas:
                    # What the pod does on the log: every role reads metadata and
                    # offsets; nodes append; workers (in their group) and the
                    # primary's pipelines (outside any group) read.
                    name = topic["spec"].get("topicName", topic["metadata"]["name"])
                    needs = [("topic", name, "Describe")]
                    if kafka.get("create_topic", True):
                        needs.append(("topic", name, "Create"))
                    if role == "run":
                        needs.append(("topic", name, "Write"))
                    if role == "worker" or is_primary:
                        needs.append(("topic", name, "Read"))
                    if role == "worker":
                        # Its group, and the group of each replay pipeline
                        # (GROUP.replay:NAME@VERSION; docs/cluster.md).
                        group = cfg.get("cluster", {}).get("group", "kappa-views")
                        needs.append(("group", group, "Read"))
                        needs.append(("group", f"{group}.replay:a_view@2", "Read"))
                    if is_primary:
                        needs.append(("group", ASSIGN_GROUP, "Describe"))
                    problems += check_kafka_client(w, c, cn, "log.kafka", kafka, kafkas[cluster], docs, needs)
            alerts_kafka = cfg.get("alerts", {}).get("kafka")
            if is_primary and alerts_kafka is not None:
                # Only the primary delivers alerts to Kafka.
                name = alerts_kafka.get("topic", "alerts")
                at = topics.get(name)
                cluster = at["metadata"].get("labels", {}).get("strimzi.io/cluster") if at else None
                if at is None and not alerts_kafka.get("create_topic", True):
                    problems.append(f"{cn}: alerts.kafka.topic {name!r} has no KafkaTopic (and create_topic is false)")
                elif cluster in kafkas or (at is None and len(kafkas) == 1):
                    needs = [("topic", name, "Describe"), ("topic", name, "Write")]
                    if alerts_kafka.get("create_topic", True):
                        needs.append(("topic", name, "Create"))
                    target = kafkas[cluster] if cluster in kafkas else next(iter(kafkas.values()))
                    problems += check_kafka_client(w, c, cn, "alerts.kafka", alerts_kafka, target, docs, needs)
            pg = [e for e in c.get("env", []) if e["name"] == ENV_PREFIX + "CLUSTER__POSTGRES"]
            if "cluster" in cfg and pg_secrets and not any(
                e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") in pg_secrets for e in pg
            ):
                problems.append(
                    f"{cn}: {ENV_PREFIX}CLUSTER__POSTGRES should come from the CloudNativePG Secret {sorted(pg_secrets)}"
                )
            if "cluster" in cfg and pg_secrets:
                # TLS to PostgreSQL: the server's certificate is verified
                # against CloudNativePG's CA, mounted where postgres_ca says.
                ca = cfg["cluster"].get("postgres_ca")
                ca_secrets = {name[: -len("-app")] + "-ca" for name in pg_secrets}
                mounted = mounted_secret_file(w, c, ca) if ca else None
                if mounted is None or mounted[0] not in ca_secrets or mounted[1] != "ca.crt":
                    found = f"Secret {mounted[0]} key {mounted[1]}" if mounted else "no Secret's file"
                    problems.append(
                        f"{cn}: cluster.postgres_ca {ca!r} is {found}; mount CloudNativePG's CA there "
                        f"(Secret {sorted(ca_secrets)}, key ca.crt)"
                    )
            if role == "run":
                nodes.append(cn)
                labelled = template_labels(w).get("app.kubernetes.io/component")
                if is_primary:
                    primaries.append(cn)
                    problems += check_primary(w, c, cn, cfg)
                    if labelled != "primary":
                        problems.append(
                            f"{cn}: runs as a primary ([cluster] primary defaults to true) but is labelled "
                            f"component={labelled!r}; a node that is not the primary needs "
                            f"{ENV_PREFIX}CLUSTER__PRIMARY=false"
                        )
                elif labelled == "primary":
                    problems.append(f"{cn}: labelled component=primary but runs with [cluster] primary = false")
            elif role == "worker":
                replicas = w["spec"].get("replicas")
                if replicas is not None and replicas > partitions:
                    problems.append(f"{cn}: {replicas} workers for {partitions} partitions: the extra ones sit idle")
                h = hpas.get((w["kind"], w["metadata"]["name"]))
                if h and h["spec"]["maxReplicas"] > partitions:
                    problems.append(
                        f"HorizontalPodAutoscaler/{h['metadata']['name']}: maxReplicas {h['spec']['maxReplicas']} "
                        f"exceeds the {partitions} partitions (workers beyond them sit idle)"
                    )
    if nodes and len(primaries) != 1:
        problems.append(
            f"{len(primaries)} containers run a primary ({', '.join(primaries) or 'none'}): run exactly one, and "
            f"{ENV_PREFIX}CLUSTER__PRIMARY=false on every other node"
        )
    if len(partitions_seen) > 1:
        problems.append(f"containers disagree on log.partitions: {sorted(partitions_seen)}")
    return problems


def mounted_secret_file(w: dict, c: dict, path: str) -> tuple[str, str] | None:
    """(Secret, key) of the file at `path` in container c, when a Secret volume puts it there."""
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    for m in c.get("volumeMounts", []):
        secret = volumes.get(m["name"], {}).get("secret")
        if secret is None:
            continue
        mount = m["mountPath"].rstrip("/")
        if m.get("subPath"):
            if path != mount:
                continue
            rel = m["subPath"]
        elif path.startswith(mount + "/"):
            rel = path[len(mount) + 1:]
        else:
            continue
        items = secret.get("items")
        if items is None:
            return secret["secretName"], rel
        for i in items:
            if i["path"] == rel:
                return secret["secretName"], i["key"]
    return None


def acl_allows(kafka: dict, user: dict | None, username: str, resource: str, name: str, op: str) -> bool:
    """Whether Kafka's simple authorizer lets the user do `op` on the resource, by its
    KafkaUser's ACLs: deny wins; Read, Write, Delete and Alter imply Describe; All is all."""
    auth = kafka["spec"]["kafka"].get("authorization") or {}
    if auth.get("type") != "simple":
        return True  # no authorizer (or one this check cannot read)
    if username in auth.get("superUsers", []) or f"User:{username}" in auth.get("superUsers", []):
        return True
    acls = ((user or {}).get("spec", {}).get("authorization") or {}).get("acls", [])

    def applies(acl: dict) -> bool:
        r = acl["resource"]
        if r["type"] != resource:
            return False
        if resource != "cluster":
            pattern = r.get("name", "")
            if r.get("patternType", "literal") == "prefix":
                if not name.startswith(pattern):
                    return False
            elif pattern not in (name, "*"):
                return False
        return acl.get("host", "*") == "*"

    allowing = {op, "All"} | ({"Read", "Write", "Delete", "Alter"} if op == "Describe" else set())
    relevant = [a for a in acls if applies(a)]
    denied = any(a.get("type") == "deny" and {op, "All"} & set(a["operations"]) for a in relevant)
    allowed = any(a.get("type", "allow") == "allow" and allowing & set(a["operations"]) for a in relevant)
    return allowed and not denied


def check_kafka_client(
    w: dict, c: dict, cn: str, section: str, kcfg: dict, kafka: dict, docs: list[dict], needs: list[tuple[str, str, str]]
) -> list[str]:
    """A Kafka client section ([log.kafka] or [alerts.kafka], with the container's
    overrides) against the Strimzi Kafka it uses: the bootstrap address of a TLS
    listener, the cluster CA mounted where ssl.ca.location says, a KafkaUser's
    SCRAM login with the password from its Secret, and ACLs for `needs`."""
    problems = []
    name, ns = kafka["metadata"]["name"], kafka["metadata"].get("namespace")
    listeners = {x["port"]: x for x in kafka["spec"]["kafka"].get("listeners", [])}
    props = {k.lower(): str(v) for k, v in (kcfg.get("properties") or {}).items()}
    bootstrap = f"{name}-kafka-bootstrap"
    # The bootstrap Service by a name its certificates carry: name, name.ns,
    # name.ns.svc, name.ns.svc.<cluster domain>.
    hosts = {bootstrap} | ({f"{bootstrap}.{ns}", f"{bootstrap}.{ns}.svc"} if ns else set())
    described = ", ".join(f"{x['name']}:{p}{' TLS' if x.get('tls') else ' plaintext'}" for p, x in listeners.items())
    chosen = []
    for b in filter(None, (x.strip() for x in str(kcfg.get("brokers", "")).split(","))):
        host, _, port = b.rpartition(":")
        if host not in hosts and not (ns and host.startswith(f"{bootstrap}.{ns}.svc.")):
            problems.append(f"{cn}: {section}.brokers {b!r} is not Kafka {name}'s bootstrap Service ({max(hosts, key=len)})")
        elif not port.isdigit() or int(port) not in listeners:
            problems.append(f"{cn}: {section}.brokers {b!r}: Kafka {name} has no listener on that port ({described})")
        elif not listeners[int(port)].get("tls"):
            problems.append(
                f"{cn}: {section}.brokers {b!r} is the plaintext listener {listeners[int(port)]['name']}; "
                f"use a TLS listener ({described})"
            )
        else:
            chosen.append(listeners[int(port)])
    if not chosen:
        return problems or [f"{cn}: {section}.brokers is empty"]
    listener = chosen[0]
    auth = (listener.get("authentication") or {}).get("type")
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    wanted = ("SASL_SSL",) if auth == "scram-sha-512" else ("SSL", "SASL_SSL")
    if protocol not in wanted:
        problems.append(
            f"{cn}: {section}.properties security.protocol is {protocol}; listener {listener['name']} "
            f"(TLS{', SCRAM-SHA-512' if auth == 'scram-sha-512' else ''}) needs {' or '.join(wanted)}"
        )
    ca = props.get("ssl.ca.location")
    ca_secret = f"{name}-cluster-ca-cert"
    if not ca:
        problems.append(f"{cn}: {section}.properties has no ssl.ca.location: the brokers' certificates come from Strimzi's cluster CA")
    else:
        mounted = mounted_secret_file(w, c, ca)
        if mounted != (ca_secret, "ca.crt"):
            found = f"Secret {mounted[0]} key {mounted[1]}" if mounted else "no Secret's file"
            problems.append(
                f"{cn}: ssl.ca.location {ca} is {found}; mount the cluster CA there (Secret {ca_secret}, key ca.crt)"
            )
    username = props.get("sasl.username")
    user = None
    if auth == "scram-sha-512":
        if props.get("sasl.mechanism", "GSSAPI").upper() != "SCRAM-SHA-512":
            problems.append(f"{cn}: {section}.properties sasl.mechanism must be SCRAM-SHA-512 (listener {listener['name']})")
        users = {
            d["metadata"]["name"]: d
            for d in docs
            if d["kind"] == "KafkaUser" and d["metadata"].get("labels", {}).get("strimzi.io/cluster") == name
        }
        user = users.get(username or "")
        if user is None:
            problems.append(f"{cn}: {section}.properties sasl.username {username!r} is no KafkaUser of Kafka {name} ({sorted(users)})")
        elif (user["spec"].get("authentication") or {}).get("type") != "scram-sha-512":
            problems.append(f"{cn}: KafkaUser/{username} does not authenticate with scram-sha-512")
        else:
            # Strimzi writes the password to the Secret named like the user, key
            # `password`, unless the KafkaUser names a Secret of yours.
            own = user["spec"]["authentication"].get("password", {}).get("valueFrom", {}).get("secretKeyRef")
            want = (own["name"], own["key"]) if own else (username, "password")
            path = tuple(section.split(".")) + ("properties", "sasl.password")
            env = [e for e in c.get("env", []) if e["name"].startswith(ENV_PREFIX) and env_path(e["name"]) == path]
            var = f"{ENV_PREFIX}{'__'.join(section.upper().split('.'))}__PROPERTIES__SASL.PASSWORD"
            if not env:
                where = "is in the config file (a ConfigMap)" if "sasl.password" in props else "is not set"
                problems.append(f"{cn}: the Kafka password {where}: set {var} from the Secret {want[0]} (key {want[1]})")
            for e in env:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    problems.append(f"{cn}: env {e['name']} must come from the Secret {want[0]} (secretKeyRef), not a literal value")
                elif (ref["name"], ref["key"]) != want:
                    problems.append(
                        f"{cn}: env {e['name']} reads Secret {ref['name']} key {ref['key']}; "
                        f"KafkaUser/{username}'s password is in Secret {want[0]} key {want[1]}"
                    )
    elif auth is not None:
        problems.append(f"{cn}: listener {listener['name']} authenticates with {auth}; this check knows scram-sha-512 only")
    if auth is not None and user is None:
        return problems  # no user to read ACLs of: said above
    for resource, rname, op in needs:
        if not acl_allows(kafka, user, username or "", resource, rname, op):
            target = "the cluster" if resource == "cluster" else f"{resource} {rname}"
            problems.append(f"{cn}: KafkaUser/{username}'s ACLs do not allow {op} on {target} ({section})")
    return problems


def check_primary(w: dict, c: dict, cn: str, cfg: dict) -> list[str]:
    """The primary's workload: one replica, never two during a rollout, its local archive kept."""
    problems = []
    n = f"{w['kind']}/{w['metadata']['name']}"
    replicas = w["spec"].get("replicas", 1)
    if replicas != 1:
        problems.append(f"{n}: {replicas} replicas of the primary; run exactly one (each primary's claim fences the other's)")
    if w["kind"] == "Deployment":
        if w["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{n}: a primary Deployment needs strategy: Recreate (a rolling update runs two primaries)")
    elif w["kind"] != "StatefulSet":
        problems.append(f"{n}: the primary must be a StatefulSet or a Deployment of one replica, not a {w['kind']}")
    archive = cfg.get("archive", {})
    if archive.get("enabled", True) and not archive.get("url"):
        # The archive is a directory: the only copy of what Kafka has deleted.
        path = archive.get("path") or cfg.get("data_dir", "data").rstrip("/") + "/archive"
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        mounts = sorted(
            (m for m in c.get("volumeMounts", []) if (path.rstrip("/") + "/").startswith(m["mountPath"].rstrip("/") + "/")),
            key=lambda m: len(m["mountPath"]),
        )
        if not mounts:
            problems.append(f"{cn}: the archive ({path}) is on no volume (archive.url unset: it is a local directory)")
        elif mounts[-1]["name"] not in claims and "persistentVolumeClaim" not in volumes.get(mounts[-1]["name"], {}):
            problems.append(
                f"{cn}: the archive ({path}) is on volume {mounts[-1]['name']}, not a PersistentVolumeClaim: "
                f"it would be lost with the pod (use a PVC, or archive.url for an object store)"
            )
    return problems


def cross_checks(docs: list[dict]) -> list[str]:
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    return check_workloads(docs, by_name) + check_selectors(docs) + check_topology(docs, by_name)


# ------------------------------------------------------------ config check


def config_checks(docs: list[dict], cloud_bin: str) -> list[str]:
    """`kappa-cloud config check` on each container's config with its environment."""
    problems = []
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    with tempfile.TemporaryDirectory() as tmp:
        for w in (d for d in docs if d["kind"] in WORKLOADS):
            for c in kappa_containers(w):
                cn = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
                text = cloud_config_for(w, c, by_name)
                if text is None:
                    continue
                path = Path(tmp) / f"{w['metadata']['name']}-{c['name']}.toml"
                path.write_text(text)
                env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
                for name, value in env_overrides(c).items():
                    # A value from a Secret: a stand-in of the same shape (a
                    # PostgreSQL URL, or a password).
                    if value is None:
                        value = "host=stand-in user=kappa dbname=kappa" if env_path(name)[-1] == "postgres" else "stand-in"
                    env[name] = value
                out = subprocess.run(
                    # --no-environment: the files the config names (TLS, CAs) are
                    # mounted in the pod, not on this machine.
                    [cloud_bin, "config", "check", "--no-environment", "--config", str(path)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if out.returncode != 0:
                    problems.append(f"{cn}: kappa-cloud config check failed:\n{out.stdout}{out.stderr}")
                else:
                    print(f"  config check ok: {cn} ({', '.join(sorted(env_overrides(c))) or 'no overrides'})")
    return problems


# ------------------------------------------------------------ extract-crd


def extract_crd(files: list[str], out: Path, source: str) -> None:
    """Writes one JSON schema per served version of each CRD."""

    def convert(node):
        """A structural OpenAPI v3 schema node as a JSON schema (draft 7) node."""
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in ("description", "x-kubernetes-validations"):
                continue  # prose, and CEL rules this checker does not evaluate
            if k == "properties":
                out[k] = {name: convert(s) for name, s in v.items()}
            elif k in ("items", "not") or (k == "additionalProperties" and isinstance(v, dict)):
                out[k] = convert(v)
            elif k in ("anyOf", "allOf", "oneOf"):
                out[k] = [convert(s) for s in v]
            else:
                out[k] = v
        if out.pop("x-kubernetes-int-or-string", False):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if out.pop("nullable", False) and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
        if "properties" in out and "additionalProperties" not in out and not preserve:
            # The API server prunes unknown fields; kubectl's default field
            # validation (Strict) makes them errors. So do we.
            out["additionalProperties"] = False
        return out

    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        crd = yaml.safe_load(Path(f).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if not v.get("served"):
                continue
            schema = convert(v["schema"]["openAPIV3Schema"])
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            schema["x-kappa-group"], schema["x-kappa-version"], schema["x-kappa-kind"] = group, v["name"], kind
            schema["x-kappa-source"] = f"{source}{Path(f).name}"
            target = out / f"{kind.lower()}-{group.split('.')[0]}-{v['name']}.json"
            target.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(f"wrote {target}")


# -------------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "extract-crd":
        p = argparse.ArgumentParser(prog="validate.py extract-crd")
        p.add_argument("files", nargs="+")
        p.add_argument("--out", type=Path, default=SCHEMAS)
        p.add_argument("--source", default="", help="where the CRDs came from, e.g. 'strimzi 1.2.0 '")
        a = p.parse_args(sys.argv[2:])
        extract_crd(a.files, a.out, a.source)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, nargs="?", default=HERE)
    p.add_argument("--cloud-bin", help="a kappa-cloud binary: also run `config check` on each container's config")
    a = p.parse_args()
    versions = [
        kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
        if v.strip() == "latest"
        else v.strip()
        for v in os.environ.get("KAPPA_K8S_VERSIONS", DEFAULT_VERSIONS).split(",")
    ]
    docs = render(a.directory)
    crds = crd_schemas()
    problems = unlisted_manifests(a.directory)
    for d in docs:
        problems += validate_schema(d, versions, crds)
    kinds = sorted({f"{d['kind']}" for d in docs})
    print(f"{len(docs)} resources ({', '.join(kinds)}); Kubernetes schemas {', '.join(versions)} (strict); "
          f"CRD schemas: {', '.join(sorted(s['x-kappa-kind'] + ' ' + s['x-kappa-group'] + '/' + s['x-kappa-version'] for s in crds.values()))}")
    if not problems:
        problems += cross_checks(docs)
    if not problems and a.cloud_bin:
        problems += config_checks(docs, a.cloud_bin)
    elif not a.cloud_bin:
        print("  no kappa-cloud binary given (--cloud-bin / KAPPA_CLOUD_BIN): the config check with each pod's environment was skipped")
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{len(docs)} resources: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

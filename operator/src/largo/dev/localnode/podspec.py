"""Pure translation of a pod's spec into what localnode launches: environment, argv, files and mounts.

Every function takes the pod (a JSON-shaped dict) and the objects it references, already fetched, and
returns plain data; the agent does the I/O. Errors carry the reason a kubelet would report.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING
from pathlib import PurePosixPath
from typing import Any

from largo.sched.quantity import parse_quantity

JSON = dict[str, Any]

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
CLUSTER_DOMAIN = "cluster.local"
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodSpecError(Exception):
    """What the pod asks for cannot be provided; ``reason`` is the container's waiting reason."""

    def __init__(self, reason: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Permanent errors fail the container at once; the others are retried, as objects may appear.
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Referenced:
    """The objects a pod reads, fetched by the agent: ConfigMap and Secret data by name (Secrets
    already decoded), and a service-account token when the pod projects one."""

    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    token: str | None = None


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes a $."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _REFERENCE.sub(replace, value)


def field_value(pod: JSON, path: str) -> str:
    """The value of a downward-API ``fieldRef``."""
    metadata = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    keyed = _FIELD_KEY.match(path)
    if keyed:
        return str((metadata.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((metadata.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    raise PodSpecError(
        "CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}", permanent=True
    )


def resource_value(container: JSON, ref: JSON) -> str:
    """The value of a ``resourceFieldRef``: limits fall back to requests, divided and rounded up."""
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "limits":
        raw = (resources.get("requests") or {}).get(resource)
    if raw is None:
        raise PodSpecError(
            "CreateContainerConfigError",
            f"resourceFieldRef {ref.get('resource')!r} has no value on a node "
            "without a declared allocatable fallback",
            permanent=True,
        )
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str((parse_quantity(raw) / divisor).to_integral_value(rounding=ROUND_CEILING))


def _lookup(kind: str, objects: Mapping[str, Mapping[str, Any]], ref: JSON) -> Any:
    name = ref.get("name", "")
    optional = bool(ref.get("optional", False))
    data = objects.get(name)
    if data is None:
        if optional:
            return None
        raise PodSpecError("CreateContainerConfigError", f"{kind} {name!r} not found")
    if "key" not in ref:
        return data
    if ref["key"] not in data:
        if optional:
            return None
        raise PodSpecError("CreateContainerConfigError", f"key {ref['key']!r} not found in {kind} {name!r}")
    return data[ref["key"]]


def container_env(pod: JSON, container: JSON, refs: Referenced, base: Mapping[str, str]) -> dict[str, str]:
    """The container's environment: ``base`` (what every container gets), then ``envFrom`` sources,
    then ``env`` in order, each value expanded against the variables defined before it."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = _lookup("configmap", refs.config_maps, source["configMapRef"]) or {}
            env.update({prefix + k: str(v) for k, v in data.items()})
        elif "secretRef" in source:
            data = _lookup("secret", refs.secrets, source["secretRef"]) or {}
            env.update({prefix + k: bytes(v).decode(errors="replace") for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom")
        if not source:
            env[name] = ""
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_value(container, source["resourceFieldRef"])
        elif "configMapKeyRef" in source:
            value = _lookup("configmap", refs.config_maps, source["configMapKeyRef"])
            if value is not None:
                env[name] = str(value)
        elif "secretKeyRef" in source:
            value = _lookup("secret", refs.secrets, source["secretKeyRef"])
            if value is not None:
                env[name] = bytes(value).decode(errors="replace")
    return env


def container_argv(container: JSON, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expansion. localnode pulls no image, so it knows no entrypoint."""
    command = container.get("command")
    if not command:
        raise PodSpecError(
            "ContainerCannotRun",
            f"container {container['name']!r} sets no command: localnode runs no images, so the image's "
            "entrypoint is unknown; set spec.containers[].command",
            permanent=True,
        )
    return [expand(str(part), env) for part in [*command, *(container.get("args") or [])]]


# --- volumes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumePlan:
    """How one pod volume is provided on the host.

    ``kind`` is ``dir`` (a directory of the pod's own), ``tmpfs`` (memory-backed emptyDir),
    ``host`` (``host_path`` as given) or ``claim`` (the claim's shared directory); ``files`` are written
    into the volume's directory before any container starts (configMap, secret, projected, downwardAPI).
    """

    name: str
    kind: str
    host_path: str = ""
    claim: str = ""
    files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)


def _key_files(
    data: Mapping[str, Any], items: list[JSON] | None, default_mode: int, as_bytes: bool
) -> dict[str, tuple[bytes, int]]:
    def encode(value: Any) -> bytes:
        return bytes(value) if as_bytes else str(value).encode()

    if not items:
        return {key: (encode(value), default_mode) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            raise PodSpecError("CreateContainerConfigError", f"key {item['key']!r} not found")
        files[item["path"]] = (encode(data[item["key"]]), int(item.get("mode", default_mode)))
    return files


def _object_files(
    kind: str, source: JSON, refs: Referenced, default_mode: int
) -> dict[str, tuple[bytes, int]]:
    objects: Mapping[str, Mapping[str, Any]] = refs.secrets if kind == "secret" else refs.config_maps
    name_key = "secretName" if kind == "secret" and "secretName" in source else "name"
    data = _lookup(kind, objects, {"name": source.get(name_key, ""), "optional": source.get("optional")})
    if data is None:
        return {}
    return _key_files(
        data, source.get("items"), int(source.get("defaultMode", default_mode)), kind == "secret"
    )


def _downward_files(pod: JSON, items: list[JSON], default_mode: int) -> dict[str, tuple[bytes, int]]:
    files = {}
    for item in items:
        if "fieldRef" not in item:
            raise PodSpecError(
                "CreateContainerConfigError",
                "downwardAPI volumes support fieldRef items only",
                permanent=True,
            )
        value = field_value(pod, item["fieldRef"]["fieldPath"])
        files[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
    return files


def plan_volume(pod: JSON, volume: JSON, refs: Referenced) -> VolumePlan:
    name = volume["name"]
    if "emptyDir" in volume:
        medium = (volume["emptyDir"] or {}).get("medium", "")
        return VolumePlan(name, "tmpfs" if medium == "Memory" else "dir")
    if "hostPath" in volume:
        return VolumePlan(name, "host", host_path=volume["hostPath"]["path"])
    if "persistentVolumeClaim" in volume:
        return VolumePlan(name, "claim", claim=volume["persistentVolumeClaim"]["claimName"])
    if "configMap" in volume:
        source = volume["configMap"]
        return VolumePlan(name, "dir", files=_object_files("configmap", source, refs, 0o644))
    if "secret" in volume:
        source = volume["secret"]
        return VolumePlan(name, "dir", files=_object_files("secret", source, refs, 0o644))
    if "downwardAPI" in volume:
        source = volume["downwardAPI"]
        mode = int(source.get("defaultMode", 0o644))
        return VolumePlan(name, "dir", files=_downward_files(pod, source.get("items") or [], mode))
    if "projected" in volume:
        projected = volume["projected"]
        mode = int(projected.get("defaultMode", 0o644))
        files: dict[str, tuple[bytes, int]] = {}
        for source in projected.get("sources") or []:
            if "configMap" in source:
                files.update(_object_files("configmap", source["configMap"], refs, mode))
            elif "secret" in source:
                files.update(_object_files("secret", source["secret"], refs, mode))
            elif "downwardAPI" in source:
                files.update(_downward_files(pod, source["downwardAPI"].get("items") or [], mode))
            elif "serviceAccountToken" in source:
                if refs.token is None:
                    raise PodSpecError("CreateContainerConfigError", "service-account token not yet issued")
                files[source["serviceAccountToken"]["path"]] = (refs.token.encode(), mode)
        return VolumePlan(name, "dir", files=files)
    kinds = sorted(set(volume) - {"name"})
    raise PodSpecError(
        "CreateContainerConfigError",
        f"volume {name!r}: localnode supports emptyDir, hostPath, persistentVolumeClaim, configMap, secret, "
        f"downwardAPI and projected volumes, not {', '.join(kinds) or 'an empty source'}",
        permanent=True,
    )


def referenced_names(pod: JSON) -> tuple[set[str], set[str], bool]:
    """The ConfigMaps and Secrets a pod reads, and whether it projects a service-account token."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    token = False
    spec = pod.get("spec", {})
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
        for item in container.get("env") or []:
            value_from = item.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"]["name"])
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            config_maps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                config_maps.add(source["configMap"]["name"])
            if "secret" in source:
                secrets.add(source["secret"]["name"])
            if "serviceAccountToken" in source:
                token = True
    return config_maps, secrets, token


def decode_secret(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (data or {}).items()}


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount in a container's mount namespace; ``source`` is empty for a fresh tmpfs."""

    source: str
    target: str
    read_only: bool = False
    tmpfs: bool = False


def container_mounts(container: JSON, sources: Mapping[str, tuple[str, bool]]) -> list[Mount]:
    """``sources`` maps a volume name to (host directory, is tmpfs). Mounts are ordered parents first."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        name = mount["name"]
        if name not in sources:
            raise PodSpecError(
                "CreateContainerConfigError",
                f"volumeMount {name!r} names no volume of the pod",
                permanent=True,
            )
        target = str(mount["mountPath"])
        if not PurePosixPath(target).is_absolute():
            raise PodSpecError("CreateContainerConfigError", f"mountPath {target!r} is not absolute", True)
        host, tmpfs = sources[name]
        sub_path = mount.get("subPath")
        if sub_path:
            if PurePosixPath(sub_path).is_absolute() or ".." in PurePosixPath(sub_path).parts:
                raise PodSpecError(
                    "CreateContainerConfigError", f"subPath {sub_path!r} leaves its volume", True
                )
            host = str(PurePosixPath(host) / sub_path)
            tmpfs = False
        mounts.append(Mount(host, target, bool(mount.get("readOnly", False)), tmpfs))
    return sorted(mounts, key=lambda m: len(PurePosixPath(m.target).parts))


# --- names -------------------------------------------------------------------------------------


def pod_hostname(pod: JSON) -> str:
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def dns_names(pod: JSON) -> list[str]:
    """The names cluster DNS gives a pod with a hostname and subdomain, longest first, then its hostname."""
    hostname = pod_hostname(pod)
    subdomain = pod["spec"].get("subdomain")
    namespace = pod["metadata"]["namespace"]
    if not subdomain:
        return [hostname]
    base = f"{hostname}.{subdomain}.{namespace}.svc"
    return [f"{base}.{CLUSTER_DOMAIN}", base, f"{hostname}.{subdomain}", hostname]


def service_names(pod: JSON) -> list[str]:
    """The headless Service names that answer with this pod's address (its subdomain's)."""
    subdomain = pod["spec"].get("subdomain")
    if not subdomain:
        return []
    base = f"{subdomain}.{pod['metadata']['namespace']}.svc"
    return [f"{base}.{CLUSTER_DOMAIN}", base]


def hosts_file(own: JSON, own_ip: str, peers: list[JSON]) -> str:
    """/etc/hosts for a pod: itself, then every pod with an IP, a hostname and a subdomain in its
    namespace, and their Services' names once per address (what a headless Service's DNS would
    answer; glibc's files backend returns every line of a name), sorted so rewrites are stable."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{own_ip}\t{' '.join(dns_names(own))}")
    namespace = own["metadata"]["namespace"]
    entries = [f"{own_ip}\t{' '.join(service_names(own))}"] if service_names(own) else []
    for peer in peers:
        ip = (peer.get("status") or {}).get("podIP")
        same = peer["metadata"].get("uid") == own["metadata"].get("uid")
        if same or not ip or peer["metadata"].get("namespace") != namespace:
            continue
        if not peer["spec"].get("subdomain") or peer["metadata"].get("deletionTimestamp"):
            continue
        if (peer.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            # Its address went back to the pool (the next pod may hold it now), and a headless
            # Service's DNS leaves finished pods out.
            continue
        entries.append(f"{ip}\t{' '.join(dns_names(peer)[:3])}")
        entries.append(f"{ip}\t{' '.join(service_names(peer))}")
    return "\n".join([*lines, *sorted(entries)]) + "\n"


# Without cluster DNS: nothing answers, and lookups fail at once (names come from the hosts file).
NO_CLUSTER_DNS = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def resolv_conf(pod: JSON, cluster_dns: str | None, cluster_domain: str, host_resolv: str) -> str:
    """The pod's /etc/resolv.conf as a kubelet writes it for its dnsPolicy: ClusterFirst (the default)
    asks the cluster's DNS with the namespace's search path; Default takes the host's; None takes only
    the pod's dnsConfig, which the other policies add to."""
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    config = spec.get("dnsConfig") or {}
    nameservers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    if policy == "Default" or (policy == "ClusterFirst" and cluster_dns is None):
        if policy == "ClusterFirst":
            return NO_CLUSTER_DNS
        for line in host_resolv.splitlines():
            words = line.split()
            if words and words[0] == "nameserver":
                nameservers += words[1:2]
            elif words and words[0] == "search":
                searches += words[1:]
            elif words and words[0] == "options":
                options += words[1:]
    elif policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        nameservers.append(str(cluster_dns))
        searches += [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        options.append("ndots:5")
    nameservers += [str(n) for n in config.get("nameservers") or []]
    searches += [str(s) for s in config.get("searches") or []]
    for option in config.get("options") or []:
        name = str(option.get("name"))
        options = [o for o in options if o.split(":")[0] != name]
        options.append(f"{name}:{option['value']}" if option.get("value") is not None else name)
    lines = [f"nameserver {n}" for n in nameservers[:3]]
    if searches:
        lines.append("search " + " ".join(dict.fromkeys(searches)))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def pod_base_env(pod: JSON, api_host: str, api_port: int, path: str) -> dict[str, str]:
    """What every container gets before its own env: the image's would-be defaults and the API server's
    address, as the kubelet provides KUBERNETES_SERVICE_* (here the node's forwarder, not a ClusterIP)."""
    return {
        "PATH": path,
        "HOSTNAME": pod_hostname(pod),
        "HOME": "/root",
        "KUBERNETES_SERVICE_HOST": api_host,
        "KUBERNETES_SERVICE_PORT": str(api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port),
    }


def grace_seconds(pod: JSON) -> int:
    metadata_grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if metadata_grace is not None:
        return int(metadata_grace)
    return int(pod["spec"].get("terminationGracePeriodSeconds", 30))

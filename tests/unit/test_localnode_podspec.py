"""localnode's pure translation of pod specs: environment, argv, volumes, mounts, hosts."""

from __future__ import annotations

from typing import Any

import pytest
from largo.dev.localnode import podspec
from largo.dev.localnode.podspec import Mount, PodSpecError, Referenced


def make_pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "job-node-0",
            "namespace": "team",
            "uid": "1234-abcd",
            "labels": {"app": "train"},
            "annotations": {"note": "x"},
        },
        "spec": {"nodeName": "local-node-0", "containers": [{"name": "main", "command": ["true"]}], **spec},
        "status": {"podIP": "10.88.1.2", "hostIP": "10.88.0.1"},
    }


def test_expand_replaces_known_names_keeps_unknown_and_unescapes() -> None:
    env = {"A": "1", "B": "two"}
    assert podspec.expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_env_order_valuefrom_and_references() -> None:
    pod = make_pod()
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "ADDR", "value": "$(POD):$(PORT)"},
            {"name": "PORT", "value": "80"},
        ],
    }
    refs = Referenced(config_maps={"settings": {"level": "debug"}}, secrets={"creds": {"token": b"s3cret"}})
    env = podspec.container_env(pod, container, refs, {"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["CFG_level"] == "debug"
    assert (env["POD"], env["NODE"], env["IP"], env["APP"]) == (
        "job-node-0",
        "local-node-0",
        "10.88.1.2",
        "train",
    )
    assert (env["LEVEL"], env["TOKEN"]) == ("debug", "s3cret")
    # Only variables defined earlier expand, as in Kubernetes.
    assert env["ADDR"] == "job-node-0:$(PORT)"


def test_missing_configmap_is_a_retryable_config_error_and_optional_is_skipped() -> None:
    pod = make_pod()
    required = {
        "name": "main",
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}],
    }
    with pytest.raises(PodSpecError) as caught:
        podspec.container_env(pod, required, Referenced(), {})
    assert caught.value.reason == "CreateContainerConfigError"
    assert "configmap 'nope' not found" in caught.value.message
    assert not caught.value.permanent
    optional = {
        "name": "main",
        "env": [
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}}}
        ],
    }
    assert "X" not in podspec.container_env(pod, optional, Referenced(), {})


def test_resource_field_ref_divides_and_rounds_up() -> None:
    container = {"name": "main", "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}}}
    assert podspec.resource_value(container, {"resource": "limits.cpu"}) == "2"
    assert podspec.resource_value(container, {"resource": "limits.memory", "divisor": "1Mi"}) == "2048"


def test_argv_expands_and_requires_a_command() -> None:
    container = {"name": "main", "command": ["python", "-m", "$(MOD)"], "args": ["--rank=$(RANK)"]}
    assert podspec.container_argv(container, {"MOD": "train", "RANK": "1"}) == [
        "python",
        "-m",
        "train",
        "--rank=1",
    ]
    with pytest.raises(PodSpecError) as caught:
        podspec.container_argv({"name": "main", "args": ["x"]}, {})
    assert caught.value.reason == "ContainerCannotRun"
    assert caught.value.permanent
    assert "set spec.containers[].command" in caught.value.message


def test_volumes_are_planned_by_kind() -> None:
    pod = make_pod()
    refs = Referenced(
        config_maps={"settings": {"a.yaml": "x: 1", "b": "2"}, "kube-root-ca.crt": {"ca.crt": "PEM"}},
        secrets={"creds": {"token": b"t"}},
        token="jwt",
    )
    assert podspec.plan_volume(pod, {"name": "shm", "emptyDir": {"medium": "Memory"}}, refs).kind == "tmpfs"
    assert podspec.plan_volume(pod, {"name": "scratch", "emptyDir": {}}, refs).kind == "dir"
    claim = podspec.plan_volume(pod, {"name": "ck", "persistentVolumeClaim": {"claimName": "ckpt"}}, refs)
    assert (claim.kind, claim.claim) == ("claim", "ckpt")
    host = podspec.plan_volume(pod, {"name": "h", "hostPath": {"path": "/data"}}, refs)
    assert (host.kind, host.host_path) == ("host", "/data")
    config = podspec.plan_volume(
        pod,
        {"name": "c", "configMap": {"name": "settings", "items": [{"key": "a.yaml", "path": "conf/a.yaml"}]}},
        refs,
    )
    assert dict(config.files) == {"conf/a.yaml": (b"x: 1", 0o644)}
    secret = podspec.plan_volume(
        pod, {"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o400}}, refs
    )
    assert dict(secret.files) == {"token": (b"t", 0o400)}
    projected = {
        "name": "kube-api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ]
        },
    }
    files = podspec.plan_volume(pod, projected, refs).files
    assert {k: v[0] for k, v in files.items()} == {"token": b"jwt", "ca.crt": b"PEM", "namespace": b"team"}


def test_unsupported_volume_is_a_permanent_error_naming_it() -> None:
    with pytest.raises(PodSpecError) as caught:
        podspec.plan_volume(make_pod(), {"name": "n", "nfs": {"server": "x", "path": "/"}}, Referenced())
    assert caught.value.permanent
    assert "not nfs" in caught.value.message


def test_referenced_names_collects_every_source() -> None:
    pod = make_pod(
        containers=[
            {
                "name": "main",
                "envFrom": [{"secretRef": {"name": "s1"}}],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c1", "key": "k"}}}],
            }
        ],
        volumes=[
            {"name": "a", "configMap": {"name": "c2"}},
            {"name": "b", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
        ],
    )
    assert podspec.referenced_names(pod) == ({"c1", "c2"}, {"s1"}, True)


def test_mounts_apply_subpath_order_parents_first_and_reject_escapes() -> None:
    sources = {"data": ("/host/data", False), "shm": ("", True)}
    container = {
        "name": "main",
        "volumeMounts": [
            {"name": "data", "mountPath": "/work/inner", "subPath": "inner", "readOnly": True},
            {"name": "data", "mountPath": "/work"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    mounts = podspec.container_mounts(container, sources)
    targets = [m.target for m in mounts]
    assert targets.index("/work") < targets.index("/work/inner")
    assert Mount("/host/data/inner", "/work/inner", True, False) in mounts
    assert Mount("", "/dev/shm", False, True) in mounts
    escape = {"name": "main", "volumeMounts": [{"name": "data", "mountPath": "/x", "subPath": "../etc"}]}
    with pytest.raises(PodSpecError):
        podspec.container_mounts(escape, sources)
    with pytest.raises(PodSpecError, match="names no volume"):
        podspec.container_mounts(
            {"name": "main", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, sources
        )


def test_hosts_file_names_the_pod_and_its_subdomain_peers_only() -> None:
    own = make_pod(hostname="job-node-0", subdomain="job")
    peer = make_pod(hostname="job-node-1", subdomain="job")
    peer["metadata"] = {**peer["metadata"], "name": "job-node-1", "uid": "other"}
    peer["status"] = {"podIP": "10.88.2.2"}
    elsewhere = make_pod(hostname="x", subdomain="job")
    elsewhere["metadata"] = {**elsewhere["metadata"], "namespace": "other-team", "uid": "third"}
    elsewhere["status"] = {"podIP": "10.88.2.3"}
    no_ip = make_pod(hostname="job-node-2", subdomain="job")
    no_ip["metadata"] = {**no_ip["metadata"], "uid": "fourth"}
    no_ip["status"] = {}
    # A finished pod of an earlier attempt keeps its status.podIP, which the pool gave to another pod.
    finished = make_pod(hostname="job-node-3", subdomain="job")
    finished["metadata"] = {**finished["metadata"], "uid": "fifth"}
    finished["status"] = {"phase": "Failed", "podIP": "10.88.2.4"}
    hosts = podspec.hosts_file(own, "10.88.1.2", [own, peer, elsewhere, no_ip, finished])
    lines = hosts.splitlines()
    assert (
        "10.88.1.2\tjob-node-0.job.team.svc.cluster.local job-node-0.job.team.svc job-node-0.job job-node-0"
        in lines
    )
    assert "10.88.2.2\tjob-node-1.job.team.svc.cluster.local job-node-1.job.team.svc job-node-1.job" in lines
    # The headless Service's name answers with every pod's address, as its DNS would.
    assert "10.88.1.2\tjob.team.svc.cluster.local job.team.svc" in lines
    assert "10.88.2.2\tjob.team.svc.cluster.local job.team.svc" in lines
    assert "10.88.2.3" not in hosts
    assert "job-node-2" not in hosts
    assert "10.88.2.4" not in hosts


def test_grace_prefers_the_deletion_grace() -> None:
    pod = make_pod(terminationGracePeriodSeconds=5)
    assert podspec.grace_seconds(pod) == 5
    pod["metadata"]["deletionGracePeriodSeconds"] = 1
    assert podspec.grace_seconds(pod) == 1


# --- resolv.conf --------------------------------------------------------------------------------

HOST_RESOLV = "# host\nnameserver 192.0.2.53\nsearch corp.example\noptions edns0\n"


def _dns_pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "team-a"}, "spec": spec}


def test_cluster_first_asks_the_cluster_dns_with_the_namespace_search_path() -> None:
    assert podspec.resolv_conf(_dns_pod(), "10.77.0.1", "cluster.local", HOST_RESOLV) == (
        "nameserver 10.77.0.1\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )


def test_without_cluster_dns_cluster_first_resolves_nothing_and_default_takes_the_host_s() -> None:
    assert podspec.resolv_conf(_dns_pod(), None, "cluster.local", HOST_RESOLV) == podspec.NO_CLUSTER_DNS
    assert podspec.resolv_conf(_dns_pod(dnsPolicy="Default"), "10.77.0.1", "cluster.local", HOST_RESOLV) == (
        "nameserver 192.0.2.53\nsearch corp.example\noptions edns0\n"
    )


def test_dns_config_is_added_and_none_takes_only_it() -> None:
    config = {
        "nameservers": ["10.9.9.9"],
        "searches": ["extra.example"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}],
    }
    assert podspec.resolv_conf(_dns_pod(dnsConfig=config), "10.77.0.1", "cluster.local", "") == (
        "nameserver 10.77.0.1\nnameserver 10.9.9.9\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local extra.example\n"
        "options ndots:2 rotate\n"
    )
    assert podspec.resolv_conf(
        _dns_pod(dnsPolicy="None", dnsConfig=config), "10.77.0.1", "cluster.local", HOST_RESOLV
    ) == ("nameserver 10.9.9.9\nsearch extra.example\noptions ndots:2 rotate\n")

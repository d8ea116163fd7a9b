"""The Helm chart: lints, renders the CRD generated from the models, installs for real, and grants the
operator what it needs and no more."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from largo.dev.cluster import LocalCluster, wait_for
from largo.dev.operator_process import OperatorProcess
from trainjobs import GROUP, VERSION, bound_claim

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "largo"


# Listed and watched by the indexes and event handlers (controllers/handlers.py).
_WATCHED = (
    "nodes", "pods", "services", "configmaps", "persistentvolumeclaims",
    "horizontalpodautoscalers.autoscaling", "deployments.apps", "trainjobs.largo.dev",
    "inferenceservices.largo.dev",
)  # fmt: skip
# Children created, and read back when a create answers 409 (controllers/kube.py).
_CREATED = (
    "pods", "services", "configmaps", "serviceaccounts", "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io", "deployments.apps", "poddisruptionbudgets.policy",
)  # fmt: skip
# Children kept: applied over our own when the create answers 409 (Kube.keep).
_KEPT = (
    "services", "serviceaccounts", "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io", "deployments.apps", "poddisruptionbudgets.policy",
)  # fmt: skip
# Every call the operator makes cluster-wide, as (verb, resource[.group][/subresource]): the
# ClusterRole must allow each (the operator's own tests run as an administrator, so only this shows a
# missing grant) and grant nothing else.
OPERATOR_CALLS = {
    # kopf: resource discovery and its events; largo posts core v1 events too.
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "events"),
    *((verb, kind) for verb in ("list", "watch") for kind in _WATCHED),
    *((verb, kind) for verb in ("create", "get") for kind in _CREATED),
    *(("patch", kind) for kind in _KEPT),
    ("delete", "pods"),
    ("delete", "trainjobs.largo.dev"),  # ttlSecondsAfterFinished
    ("patch", "trainjobs.largo.dev/status"),
    ("patch", "inferenceservices.largo.dev"),  # the autoscaler's spec.replicas
    ("patch", "inferenceservices.largo.dev/status"),
    # Owner references with blockOwnerDeletion, where OwnerReferencesPermissionEnforcement is on.
    ("update", "trainjobs.largo.dev/finalizers"),
    ("update", "inferenceservices.largo.dev/finalizers"),
    # Held so that largo may grant them in the router's Role (RBAC allows no escalation).
    ("list", "endpointslices.discovery.k8s.io"),
    ("watch", "endpointslices.discovery.k8s.io"),
}


def _qualified(resource: str, group: str) -> str:
    """``trainjobs/status`` of ``largo.dev`` as ``kubectl auth can-i`` names it."""
    kind, _, subresource = resource.partition("/")
    name = f"{kind}.{group}" if group else kind
    return f"{name}/{subresource}" if subresource else name


def helm(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cluster.tools.path("helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_chart_lints_and_renders_the_generated_crd(cluster: LocalCluster, tmp_path: Path) -> None:
    lint = helm(cluster, "lint", str(CHART), "--strict")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = helm(cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3")
    assert rendered.returncode == 0, rendered.stderr
    documents = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "--leader-elect" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "imagePullSecrets" not in deployment["spec"]["template"]["spec"]
    # A drain takes the leader and its standby one at a time, and they preferably run on two nodes.
    budget = next(doc for doc in documents if doc["kind"] == "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    single = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
        "--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=1",
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    assert "PodDisruptionBudget" not in single.stdout  # one replica: a budget would block every drain
    assert "podAntiAffinity" not in single.stdout
    private = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
        "--set", "imagePullSecrets[0].name=registry",
    )  # fmt: skip
    assert private.returncode == 0, private.stderr
    pulled = next(doc for doc in yaml.safe_load_all(private.stdout) if doc and doc["kind"] == "Deployment")
    assert pulled["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    alone = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
        "--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=2",
    )  # fmt: skip
    assert alone.returncode != 0, "two replicas without leader election must be refused"
    crds = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == ["inferenceservices.largo.dev", "trainjobs.largo.dev"]
    for name, crd in crds.items():
        generated = yaml.safe_load((REPO / "crds" / f"{name}.yaml").read_text())
        assert crd["spec"] == generated["spec"]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # Settings the chart does not name reach the operator through operator.extraEnv.
    extra = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
        "--set-string", "operator.extraEnv[0].name=LARGO_WATCH_INACTIVITY_SECONDS",
        "--set-string", "operator.extraEnv[0].value=90",
    )  # fmt: skip
    assert extra.returncode == 0, extra.stderr
    rendered_env = next(
        doc for doc in yaml.safe_load_all(extra.stdout) if doc and doc["kind"] == "Deployment"
    )["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LARGO_WATCH_INACTIVITY_SECONDS", "value": "90"} in rendered_env
    assert "LARGO_ROUTER_IMAGE" in [entry["name"] for entry in rendered_env]  # beside the chart's own
    unquoted = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
        "--set", "operator.extraEnv[0].name=LARGO_WATCH_INACTIVITY_SECONDS",
        "--set", "operator.extraEnv[0].value=90",
    )  # fmt: skip
    assert unquoted.returncode != 0  # a number where Kubernetes takes a string: refused by the schema
    # A tag `--set` reads as a number, and Prometheus's durations in full (1m30s, 1d): taken.
    numeric = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", "--set", "image.tag=2",
        "--set", "monitoring.serviceMonitor.interval=1m30s", "--set", "monitoring.podMonitor.interval=1d",
    )  # fmt: skip
    assert numeric.returncode == 0, numeric.stderr
    tagged = next(d for d in yaml.safe_load_all(numeric.stdout) if d and d["kind"] == "Deployment")
    assert tagged["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":2")
    # In a values file a number is a float: written whole, and one that is not whole is refused.
    for index, (tag, expected) in enumerate(
        (("1234567", ":1234567"), ("0", ":0"), ('""', ":0.1.0"), ("1.5", None))
    ):
        values = tmp_path / f"tag-{index}.yaml"
        values.write_text(f"image:\n  tag: {tag}\n")
        rendered = helm(
            cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", "-f", str(values)
        )
        if expected is None:
            assert rendered.returncode != 0
            assert "/image/tag" in rendered.stderr, rendered.stderr
            continue
        assert rendered.returncode == 0, rendered.stderr
        assert f'image: "largo-operator{expected}"' in rendered.stdout
    for interval in ("90", "1m30", "1.5m", "m"):
        bad = helm(
            cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3",
            "--set-string", f"monitoring.serviceMonitor.interval={interval}",
        )  # fmt: skip
        assert bad.returncode != 0, interval
        assert "interval" in bad.stderr, bad.stderr

    without = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", "--set", "crds.enabled=false"
    )
    assert "CustomResourceDefinition" not in without.stdout
    wrong = helm(cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", "--set", "replicas=3")
    assert wrong.returncode != 0
    assert "additional properties" in wrong.stderr.lower() or "replicas" in wrong.stderr
    # Values the schema allows but the operator would refuse at start (a crash loop) fail the install.
    election = "operator.leaderElection"
    for values, says in (
        ([f"{election}.leaseDurationSeconds=5"], "must be less than leaseDurationSeconds"),
        ([f"{election}.renewDeadlineSeconds=8"], "renewDeadlineSeconds + 2 (a write's connect timeout)"),
        (
            [f"{election}.retryPeriodSeconds=5", f"{election}.leaseDurationSeconds=20"],
            "must be more than 1.2 x retryPeriodSeconds",
        ),
        (["operator.metricsPort=8080"], "8080 is the operator's health port"),
        (["operator.restartBackoffSeconds=600"], "must be at least operator.restartBackoffSeconds"),
    ):
        sets = [arg for value in values for arg in ("--set", value)]
        refused = helm(cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", *sets)
        assert refused.returncode != 0, values
        assert says in refused.stderr, refused.stderr


def test_helm_install_runs_the_operator_with_least_privilege(
    cluster: LocalCluster, api: client.ApiClient, crds: None, operator: OperatorProcess, tmp_path: Path
) -> None:
    namespace = f"largo-{uuid.uuid4().hex[:6]}"
    release = f"largo-{uuid.uuid4().hex[:6]}"
    # The session's CRD is already installed from crds/: the chart leaves it to that.
    install = helm(
        cluster, "install", release, str(CHART), "--namespace", namespace, "--create-namespace",
        "--set", "crds.enabled=false", "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    try:
        apps = client.AppsV1Api(api)
        deployment = apps.read_namespaced_deployment("largo-operator", namespace)
        assert deployment.status.ready_replicas == 2  # a leader and a standby
        budget = client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("largo-operator", namespace)
        assert budget.spec.max_unavailable == 1
        account = f"system:serviceaccount:{namespace}:largo-operator"

        def can(verb: str, resource: str) -> bool:
            name, _, subresource = resource.partition("/")
            extra = [f"--subresource={subresource}"] if subresource else []
            answer = cluster.kubectl("auth", "can-i", verb, name, *extra, "--as", account, "-A", check=False)
            return answer.stdout.strip() == "yes"

        for verb, resource in sorted(OPERATOR_CALLS):
            assert can(verb, resource), (verb, resource)
        # And nothing more: every grant of the ClusterRole is a call the operator makes.
        role = client.RbacAuthorizationV1Api(api).read_cluster_role("largo-operator")
        granted = {
            (verb, _qualified(resource, group))
            for rule in role.rules
            for group in rule.api_groups
            for resource in rule.resources
            for verb in rule.verbs
        }
        assert granted == OPERATOR_CALLS

        def can_use_lease(verb: str, where: str) -> bool:
            answer = cluster.kubectl(
                "auth", "can-i", verb, "leases.coordination.k8s.io", "--as", account, "-n", where,
                check=False,
            )  # fmt: skip
            return answer.stdout.strip() == "yes"

        # The kubernetes client's LeaseLock reads, creates and replaces the Lease.
        for verb in ("get", "create", "update"):
            assert can_use_lease(verb, namespace), verb
            assert not can_use_lease(verb, "default"), verb  # the Lease in its own namespace only
        for verb, resource in [
            ("delete", "nodes"),
            ("patch", "trainjobs.largo.dev"),
            ("get", "secrets"),
            ("delete", "inferenceservices.largo.dev"),
            ("create", "persistentvolumeclaims"),
            ("patch", "horizontalpodautoscalers.autoscaling"),
        ]:
            assert not can(verb, resource), (verb, resource)
        # The list above is written by hand: the operator itself, run as the chart's account, shows
        # what it lacks on the paths it takes.
        _serve_as_the_chart_s_account(cluster, api, namespace, operator, tmp_path)
    finally:
        uninstall = helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")
        assert uninstall.returncode == 0, uninstall.stderr
    wait_for(
        lambda: not client.AppsV1Api(api).list_namespaced_deployment(namespace).items, 60, "release removed"
    )


def test_upgrades_turn_leader_election_on_and_off_without_two_acting_operators(
    cluster: LocalCluster, api: client.ApiClient, crds: None
) -> None:
    """Off to on: the unelected operator would act beside the new leader, so it is stopped first (a
    Recreate rollout, that once; later upgrades roll). On to off: Recreate without the rolling
    parameters an elected release had (the API server refuses the two together)."""
    namespace = f"largo-{uuid.uuid4().hex[:6]}"
    release = f"largo-{uuid.uuid4().hex[:6]}"
    apps = client.AppsV1Api(api)
    common = (
        "--namespace", namespace, "--create-namespace", "--set", "crds.enabled=false", "--wait",
        "--timeout", "120s",
    )  # fmt: skip
    unelected = ("--set", "operator.leaderElection.enabled=false", "--set", "operator.replicas=1")

    def upgrade(*values: str) -> client.V1Deployment:
        done = helm(cluster, "upgrade", "--install", release, str(CHART), *common, *values)
        assert done.returncode == 0, done.stdout + done.stderr
        deployment = apps.read_namespaced_deployment("largo-operator", namespace)
        assert deployment.status.ready_replicas == deployment.spec.replicas
        return deployment

    try:
        assert upgrade(*unelected).spec.strategy.type == "Recreate"
        elected = upgrade()
        assert elected.spec.strategy.type == "Recreate"
        assert elected.spec.strategy.rolling_update is None
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace).items
        assert len(pods) == 2
        assert all("--leader-elect" in pod.spec.containers[0].args for pod in pods)
        assert upgrade("--set", "operator.logLevel=debug").spec.strategy.type == "RollingUpdate"
        back = upgrade(*unelected)
        assert (back.spec.strategy.type, back.spec.strategy.rolling_update) == ("Recreate", None)
        assert back.spec.replicas == 1
    finally:
        uninstall = helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")
        assert uninstall.returncode == 0, uninstall.stderr


def test_the_monitoring_objects_are_valid_for_the_prometheus_operator(
    cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """ServiceMonitor, PrometheusRule and the dashboard ConfigMap, rendered with their toggles on and
    checked by the API server against the Prometheus Operator's own CRDs (server-side dry run)."""
    for crd in sorted(cluster.tools.prometheus_operator_crds.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    for kind in ("servicemonitors", "podmonitors", "prometheusrules"):
        cluster.wait_established(f"{kind}.monitoring.coreos.com")
    rendered = helm(
        cluster, "template", "largo", str(CHART), "--kube-version", "1.36.3", "--namespace", namespace,
        "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.podMonitor.enabled=true",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    documents = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    wanted = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "Service"}
    monitoring = [doc for doc in documents if doc["kind"] in wanted]
    assert sorted(doc["kind"] for doc in monitoring) == sorted([*wanted, "PodMonitor"])  # trainers, serving
    monitor = next(doc for doc in monitoring if doc["kind"] == "ServiceMonitor")
    # The operator's series carry their object's namespace: the target's must not replace it.
    assert [endpoint["honorLabels"] for endpoint in monitor["spec"]["endpoints"]] == [True]
    rule = next(doc for doc in monitoring if doc["kind"] == "PrometheusRule")
    rule_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rule_file["groups"]  # the file promtool tests, unchanged
    dashboard = next(doc for doc in monitoring if doc["kind"] == "ConfigMap")
    assert dashboard["data"]["largo.json"] == (CHART / "files" / "dashboard.json").read_text()
    manifest = Path(cluster.kubeconfig).parent / f"monitoring-{namespace}.yaml"
    manifest.write_text(yaml.safe_dump_all(monitoring))
    applied = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "servicemonitor.monitoring.coreos.com/largo-operator created (server dry run)" in applied.stdout
    assert "prometheusrule.monitoring.coreos.com/largo-operator created (server dry run)" in applied.stdout
    assert (
        "podmonitor.monitoring.coreos.com/largo-operator-trainers created (server dry run)" in applied.stdout
    )
    assert (
        "podmonitor.monitoring.coreos.com/largo-operator-serving created (server dry run)" in applied.stdout
    )


def _serve_as_the_chart_s_account(
    cluster: LocalCluster, api: client.ApiClient, release_namespace: str, operator: OperatorProcess, tmp: Path
) -> None:
    """The operator, with the token of the chart's ServiceAccount in place of the session's
    administrator, makes an InferenceService's pods, Services and router, then, restarted, keeps them
    (a create answering 409, a read, a server-side apply over each): no call of it is forbidden."""
    core = client.CoreV1Api(api)
    token = core.create_namespaced_service_account_token(
        "largo-operator", release_namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}}
    ).status.token
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": token}
    kubeconfig = tmp / "chart-account.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    work = f"work-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": work}})
    volume = bound_claim(core, work, "weights", "ReadOnlyMany", hostPath={"path": "/models"})
    log = tmp / "chart-account-operator.log"
    as_account = OperatorProcess(kubeconfig, log)
    operator.stop()  # one operator at a time on the cluster
    try:
        as_account.start()
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceService",
            "metadata": {"name": "chat"},
            "spec": {
                "model": {"claimName": "weights"},
                "resourcesPerNode": {"nvidia.com/gpu": 1, "cpu": "1", "memory": "1Gi"},
                "podTemplate": {"terminationGracePeriodSeconds": 1},
            },
        }
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(GROUP, VERSION, work, "inferenceservices", body)

        def ready() -> bool:
            status = custom.get_namespaced_custom_object(GROUP, VERSION, work, "inferenceservices", "chat")
            return (status.get("status") or {}).get("ready") == "1/1"

        wait_for(
            ready,
            120,
            "the service ready, served by the operator as the chart's account",
            as_account.assert_alive,
        )
        rbac = client.RbacAuthorizationV1Api(api)
        changed = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
        rbac.patch_namespaced_role("chat-router", work, {"rules": changed})
        as_account.stop()
        as_account.start()
        wait_for(
            lambda: rbac.read_namespaced_role("chat-router", work).rules[0].resources == ["endpointslices"],
            60,
            "the router's Role kept by the restarted operator",
            as_account.assert_alive,
        )
        # largo's own (the API server's IP repair may post a Warning about the Service of that name).
        told = "involvedObject.name=chat,involvedObject.kind=InferenceService"
        events = core.list_namespaced_event(work, field_selector=told).items
        assert not [e.message for e in events if e.type == "Warning"]
        assert "forbidden" not in log.read_text().lower(), log.read_text()[-4000:]
    finally:
        as_account.stop()
        operator.start()
        core.delete_namespace(work)
        core.delete_persistent_volume(volume)

"""The ``largo-local`` StorageClass of a local cluster: claims bound to hostPath volumes under the
cluster's claims directory, as a local-path provisioner would, and removed once released."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from largo.dev.localnode.node import NODE_LABEL

logger = logging.getLogger("largo.localnode")

STORAGE_CLASS = "largo-local"
PROVISIONER = "largo.dev/localnode"
PROVISION_SECONDS = 1.0


class ClaimProvisioner:
    def __init__(self, api: client.ApiClient, claims_dir: Path, stopping: threading.Event) -> None:
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        self.claims_dir = claims_dir
        self.stopping = stopping

    def ensure_storage_class(self) -> None:
        storage: Any = client.StorageV1Api(self.api)
        body = {
            "metadata": {"name": STORAGE_CLASS},
            "provisioner": PROVISIONER,
            "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Delete",
        }
        try:
            storage.create_storage_class(body)
        except ApiException as error:
            if error.status != 409:  # another node of the cluster made it first
                raise

    def run(self) -> None:
        while not self.stopping.wait(PROVISION_SECONDS):
            try:
                self._provision_claims()
                self._reclaim_volumes()
            except Exception as error:  # tried again next round
                logger.warning("claim provisioning failed: %s", error)

    def _reclaim_volumes(self) -> None:
        """Deletes released volumes of the class and their directories (reclaim policy Delete)."""
        for volume in self.core.list_persistent_volume(label_selector=f"{NODE_LABEL}=claim").items:
            if volume.status.phase != "Released" or volume.spec.host_path is None:
                continue
            shutil.rmtree(volume.spec.host_path.path, ignore_errors=True)
            with contextlib.suppress(ApiException):
                self.core.delete_persistent_volume(volume.metadata.name)

    def _provision_claims(self) -> None:
        """Binds pending claims of the ``largo-local`` class to a hostPath volume under the claims
        directory, as a local-path provisioner would."""
        for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if claim.spec.storage_class_name != STORAGE_CLASS or claim.spec.volume_name:
                continue
            namespace, name = claim.metadata.namespace, claim.metadata.name
            path = self.claims_dir / namespace / name
            path.mkdir(parents=True, exist_ok=True)
            volume = {
                "metadata": {"name": f"pvc-{claim.metadata.uid}", "labels": {NODE_LABEL: "claim"}},
                "spec": {
                    "capacity": {"storage": (claim.spec.resources.requests or {}).get("storage", "1Gi")},
                    "accessModes": claim.spec.access_modes or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": namespace,
                        "name": name,
                        "uid": claim.metadata.uid,
                    },
                },
            }
            with contextlib.suppress(ApiException):  # the other nodes of the cluster race for it
                self.core.create_persistent_volume(volume)

"""kubesim: the simulated Kubernetes cluster this project tests and demonstrates on.

A stateful Kubernetes API over HTTP (kmock's emulator, made to run kopf, with selectors,
the status subresource, watches, and the defaults and CEL rules of the CRDs it is given),
explicit stand-ins for the controllers a cluster runs (Job controller, kubelet, garbage
collector; a kubelet that runs pods as local processes), and the real servers around it
(SeaweedFS for S3, Prometheus), put together by :class:`kubesim.cluster.LocalCluster`.
It is test and demo infrastructure: not part of the ``dreambooth`` package or its wheel,
and the product never imports it (kubesim/tests/test_boundaries.py).

==============================  ===========================================================
``kubesim.kube``                ``running_kube()``, the ``Kube`` handle (sync API, kubectl)
``kubesim.emulator``, ``rest``  the API's state and verbs; its HTTP routing and watches
``kubesim.api``                 pure pieces: errors, declarations, selectors, patches
``kubesim.crds``                what a CRD's schema makes the API server do (defaults, CEL)
``kubesim.controllers``         Job controller, state-writing kubelet, GC, ControllerLoop
``kubesim.kubelet``             ``ProcessKubelet``: pods as local processes
``kubesim.container``           a pod's container set up on one machine (volumes, env, DNS)
``kubesim.prometheus``          Prometheus scraping pods, with the chart's relabelings
``kubesim.s3server``            SeaweedFS ``weed mini`` as an S3 server on 127.0.0.1
``kubesim.faultproxy``          a TCP proxy that slows, cuts or stalls connections
``kubesim.procs``, ``net``      child processes, polling, free ports
``kubesim.cluster``             ``LocalCluster``: the DreamBooth operator on all of the above
``kubesim.demo``                ``make demo-cluster``
==============================  ===========================================================

Everything but ``cluster`` and ``demo`` is independent of DreamBooth (it imports nothing
from ``dreambooth``); those two run this project's operator and example on it.
"""

"""The text of the files ``mesh k8s`` writes (``str.format`` templates; ``{header}`` is
the generated-file mark). Kept apart from the logic in :mod:`mesh.cli._k8s`."""

from __future__ import annotations

AGENT = """\
{header}# Agent "{name}": {description}
# Stateless (the router hands it the history it needs): any replica serves any turn.
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {name}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/component: agent
automountServiceAccountToken: false
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/component: agent
spec:
  replicas: 1
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      app.kubernetes.io/name: {name}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {name}
        app.kubernetes.io/component: agent
    spec:
      serviceAccountName: {name}
      automountServiceAccountToken: false
      # Longer than the drain (MESH_SERVER__GRACE_PERIOD_S in mesh-env).
      terminationGracePeriodSeconds: 30
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: agent
          image: grpc-agent-mesh
          args: ["agent", "{name}", "--port", "{port}"]
          ports:
            - name: grpc
              containerPort: {port}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: mesh-env
            # Provider API keys (ANTHROPIC_API_KEY, OPENAI_API_KEY, ...); optional: the
            # default mesh runs on the offline model. See docs/kubernetes.md.
            - secretRef:
                name: mesh-provider-keys
                optional: true
          startupProbe:
            grpc:
              port: {port}
              service: mesh.v1.AgentService
            periodSeconds: 2
            timeoutSeconds: 2
            failureThreshold: 30
          readinessProbe:
            grpc:
              port: {port}
              service: mesh.v1.AgentService
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 1
          livenessProbe:
            grpc:
              port: {port}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          resources:
            requests:
              cpu: 100m
              memory: 128Mi
            limits:
              cpu: "1"
              memory: 512Mi
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: config
              mountPath: /etc/mesh/config
              readOnly: true
            - name: data
              mountPath: /data
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: config
          configMap:
            name: mesh-config
        - name: data
          emptyDir:
            sizeLimit: 64Mi
        - name: tmp
          emptyDir:
            medium: Memory
            sizeLimit: 16Mi
---
# Headless: {name}.mesh.svc.cluster.local resolves to every ready replica; the router
# re-resolves it (router.discovery.dns) and balances streams per pod.
apiVersion: v1
kind: Service
metadata:
  name: {name}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/component: agent
spec:
  clusterIP: None
  selector:
    app.kubernetes.io/name: {name}
  ports:
    - name: grpc
      port: {port}
      targetPort: grpc
      protocol: TCP
"""

AGENTS_KUSTOMIZATION = """\
{header}# One file per agent of the mesh file; k8s/base/kustomization.yaml includes this folder.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

resources:
{resources}"""

DISCOVERY = """\
{header}# The router finds agent replicas through the headless Services' DNS names
# (merged into the ConfigMap mesh-env by k8s/base/kustomization.yaml).
MESH_ROUTER__DISCOVERY__DNS={dns}
"""

HPA_HEAD = """\
{header}# Agents scale on CPU (the offline/remote-model work is mostly I/O; tune per provider).
# The Deployments carry no replicas field in prod, so that `kubectl apply` never fights
# the autoscaler; the router re-resolves the headless Services and picks up new pods.
"""
HPA = """\
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {name}
  labels: {{app.kubernetes.io/name: {name}, app.kubernetes.io/component: agent}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}
  minReplicas: 2
  maxReplicas: 10
  metrics:
    - type: Resource
      resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 70}}}}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
"""

PDB_HEAD = """\
{header}# Voluntary disruptions (node drains, upgrades) keep one ready pod of every service;
# the pods being evicted drain their open streams first (SIGTERM -> NOT_SERVING).
"""
PDB = """\
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {name}
  labels: {{app.kubernetes.io/name: {name}, app.kubernetes.io/component: {component}}}
spec:
  minAvailable: 1
  # A pod that never became ready may be evicted (it serves nothing).
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels: {{app.kubernetes.io/name: {name}}}
"""

AUDIENCES_HEAD = """\
{header}# Each service's token audience, from the Secret mesh-identity's optional key
# audience-<service> (Entra ID: the application ID of the service's app registration;
# default mesh-router / mesh-agent-<name>). The router needs every agent's (it exchanges
# the user's token for each); an agent needs its own.
"""
AUDIENCES = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  template:
    spec:
      containers:
        - name: {container}
          env:
{env}"""
AUDIENCE_ENV = """\
            - name: MESH_AUTH__AUDIENCES__{var}
              valueFrom:
                secretKeyRef: {{name: mesh-identity, key: audience-{service}, optional: true}}
"""

"""moto_server with one test-only fidelity patch: ECS container runtime ids.

The real ECS reports, for each container of a task that runs, `runtimeId` (the container
runtime's id, `<task-id>-<digits>`) and `managedAgents` (the ExecuteCommandAgent Session
Manager talks to). Session Manager's target for a Fargate task is
`ecs:<cluster>_<task-id>_<runtimeId>`, so bastion needs the field; moto 5.2 does not
report it. This launcher gives every container of a RUNNING task a stable `runtimeId` and
a RUNNING ExecuteCommandAgent, then runs moto's server with the usual arguments
(`-H HOST -p PORT`).

This is a test-only fidelity patch to moto; the product reads `runtimeId` exactly as ECS
returns it. Nothing else in moto is changed.
"""

import sys
import zlib

from moto.ecs import models as ecs_models
from moto.server import main


def _runtime_id(task, container):
    """`<task-id>-<10 digits>`, stable for the container (like ECS's format)."""
    digits = zlib.crc32(container.container_arn.encode()) % 10**10
    return f"{task.id.replace('-', '')}-{digits:010d}"


def _report_runtime(task):
    """Once a task runs, its containers run and carry a runtime id and the agent."""
    status = task.last_status
    for container in task.containers:
        if status == "RUNNING" and not getattr(container, "runtime_id", None):
            container.runtime_id = _runtime_id(task, container)
            container.managed_agents = [
                {"name": "ExecuteCommandAgent", "lastStatus": "RUNNING"}
            ]
        if getattr(container, "runtime_id", None) and status in ("RUNNING", "STOPPED"):
            container.last_status = status
            container.managed_agents = [
                {"name": "ExecuteCommandAgent", "lastStatus": status}
            ]
    return task


def _patch(name):
    original = getattr(ecs_models.EC2ContainerServiceBackend, name)

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for task in result if isinstance(result, list) else [result]:
            _report_runtime(task)
        return result

    setattr(ecs_models.EC2ContainerServiceBackend, name, patched)


for _name in ("run_task", "describe_tasks", "stop_task"):
    _patch(_name)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

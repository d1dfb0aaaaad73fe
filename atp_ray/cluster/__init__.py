"""Searches on a Ray cluster: a cloud one described by ``cluster.yaml``, or nodes on this machine.

``atp-ray cluster VERB`` (its command line: :mod:`atp_ray.cli_cluster`): ``up``, ``submit``,
``resume``, ``report``, ``export`` and ``down`` drive a cloud cluster through the ``ray``
command line (``ray up``, ``ray job submit``, ``ray rsync-down``, ``ray down``); ``local-up``
and ``local-down`` start and stop an autoscaling cluster on this machine that the same verbs
reach with ``--cluster local``.

A search is a Ray job: ``ray job submit --working-dir <this checkout> -- atp-ray search ...``.
Its driver runs on the head node (it asks for the ``search_driver`` resource, which only the
head offers); the job's command is built by a :class:`~atp_ray.cluster.commands.JobCommands`,
so a stand-in program with the same command line can take the search's place (the tests do).
Every verb checks its prerequisites before anything starts and names what is missing.

Modules, one concern each: ``verbs`` (what the command does), ``jobs`` (submit, status, wait,
stop), ``commands`` (the jobs' command lines), ``clusters`` (cloud and local, one interface),
``local`` (the local cluster's life cycle), ``processes`` (node processes), ``rest`` (the Ray
job API), ``shell`` (the ``ray`` command line), ``prerequisites``; and what the search and Ray
Train read about a cluster: ``config`` (cluster YAMLs) and ``capacity`` (what it can hold).
Nothing is imported here.
"""

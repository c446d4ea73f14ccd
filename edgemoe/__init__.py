"""edgemoe: serve a Mixture-of-Experts LLM from a peer-to-peer group of edge servers.

Layering is one way only: ``edgemoe.cli -> edgemoe.daemon -> edgemoe.{model,placement,stats,
cluster,sim}``. ``cluster`` and ``placement`` stay pure Python (numpy/scipy) so the simulators can
run thousands of nodes without torch or sockets.
"""

__version__ = "0.1.0"

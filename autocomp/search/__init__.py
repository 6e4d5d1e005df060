"""The search rooms: ``config`` (the request and its settings table), ``study`` (storages, resume, heartbeat,
the front on disk), ``trial`` (one trial: decode -> size -> repair -> constraints -> evaluate), ``seeds``
(ILP and uniform seeds), ``engine`` (the loop); and ``space``-level helpers: samplers, the front refiner,
Pareto extraction, budget repair, the sensitivity database."""

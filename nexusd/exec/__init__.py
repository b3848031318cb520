"""The execution protocol between nodes: its wire records and channel (`wire`), the host
side that runs spans (`hosting`), the origin side that drives a job across hosts with
failover (`session`) and the route planner (`planner`)."""

"""One node's process: the daemon composing every service (`daemon`), its part in the mesh
(`mesh_service`) and its files on disk (`files`)."""

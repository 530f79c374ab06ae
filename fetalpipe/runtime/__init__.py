"""Where a run's files live (local paths and object stores), what the console shows, and how Ray is reached."""

"""Models: the time convention (flow), the joint transformer (mmdit) and its parts."""

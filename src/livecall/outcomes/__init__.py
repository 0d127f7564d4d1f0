"""What happened on a call, made useful after it: post-call analysis and caller memory."""

"""The runtime plane: openYuanrong (yr init, local or cluster mode), the data system worker the App
starts in local mode, and child processes that never outlive the App."""

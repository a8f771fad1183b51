"""What a process runs on: the process group and device (dist), numeric precision, preemption signals.

The only global state foundry keeps is the process group; everything here is cheap to import.
"""

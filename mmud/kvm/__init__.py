"""The simulated KVM: what the ioctls of a VM fd reach (VM, memslots, vCPUs, dirty logging),
the shadow MMU (mmud.kvm.mmu), address-space isolation, and the loaded module's state.

It knows nothing of the guest model above it, the daemon or the filesystem; below it are
only the x86 architecture facts (mmud.x86) and the user-visible formats (mmud.uapi).
"""

def export_diffusers(pipe, out_dir):
    raise NotImplementedError

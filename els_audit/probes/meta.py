"""The ``node.meta`` keys the probes write on a traced graph (all under ``els_``).

``els_op``      :class:`els_audit.probes.ops.OpInfo` -- canonical op kind, parameters, data operands.
``els_shape``   output shape (tuple), a tuple of shapes for multi-output ops, or ``None``.
``els_value``   concrete value of non-tensor nodes (``x.shape``, sizes, dtypes).
``els_vary``    per dim of a tensor output: does the value vary along that dim (from the
                example run; tells a learned position embedding from a broadcast time embedding).
``els_image``   ``True`` when the node's value depends on the image input (through data
                operands; shape queries such as ``x.shape`` do not count).
``els_on_path`` ``True`` when the node lies on a path from the image to the analysed output.
``els_select`` for ``getattr(result, "values")`` on a multi-output result: which output it is.
``els_rf``      the receptive-field pass's :class:`els_audit.probes.rf.RFAnnotation`.
``els_eq``      the breakers the structural pass found at the node.
"""

META_OP = "els_op"
META_SHAPE = "els_shape"
META_VALUE = "els_value"
META_VARY = "els_vary"
META_IMAGE = "els_image"
META_ON_PATH = "els_on_path"
META_SELECT = "els_select"
META_RF = "els_rf"
META_EQ = "els_eq"
